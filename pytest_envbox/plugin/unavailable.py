"""A host that cannot run services: skip the tests that need one, or error, never a traceback.

``envbox_unavailable`` (ini) or ``--envbox-unavailable`` (option) says what a test that needs a
service does on a host that refuses services altogether (not Linux; a container's seccomp
profile; AppArmor's user namespace restriction...: :mod:`pytest_envbox.kernel.refusal`):

- ``skip``: the test is skipped, the reason one line in the short summary (``-rs``). The default
  outside CI: a developer on macOS, or on a laptop without user namespaces, runs the rest of the
  suite and reads why the envbox tests did not run.
- ``error``: the test errors; the first with the whole explanation (what was refused, why, the
  fix), the others with one line pointing at it. The default when the ``CI`` environment variable
  is set (GitHub Actions, GitLab CI, Jenkins' plugins and most others set it): a pipeline must
  never go green because its integration tests silently skipped.

Only a refusal of the host skips (:class:`~pytest_envbox.errors.HostUnsupported` with a
``refusal``); a missing feature that one service needs (netem, cgroups for its limits) and every
other failure stay that test's error. The host is probed once per process, at the first failure.

Registered as a plugin of its own by :func:`pytest_envbox.plugin.pytest_configure`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator

import pytest

from pytest_envbox.errors import HostUnsupported

__all__ = ["CHOICES", "add_options", "check", "mode", "pytest_runtest_makereport"]

CHOICES = ("error", "skip")
#: the host's refusal, once a test has met it: (its kind, its headline)
_REFUSED = pytest.StashKey[tuple[str, str]]()
#: the test that reported it in full
_FIRST = pytest.StashKey[str]()


def add_options(parser: pytest.Parser, group: pytest.OptionGroup) -> None:
    group.addoption("--envbox-unavailable", choices=CHOICES, default=None,
                    help="on a host that cannot run services: skip the tests that need them, or "
                         "error (default: error when $CI is set, skip otherwise)")  # fmt: skip
    parser.addini("envbox_unavailable", "on a host that cannot run services: 'skip' the tests "
                  "that need them or 'error' (default: error when $CI is set, else skip)",
                  default="")  # fmt: skip


def _ci() -> bool:
    value = os.environ.get("CI", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def mode(config: pytest.Config) -> str:
    """``error`` or ``skip``: the option, else the ini value, else by ``$CI``."""
    chosen = config.getoption("envbox_unavailable") or str(config.getini("envbox_unavailable")).strip()
    if chosen:
        return chosen
    return "error" if _ci() else "skip"


def check(config: pytest.Config) -> None:
    """At configure: a bad ini value is a usage error that names the key and the choices."""
    value = str(config.getini("envbox_unavailable")).strip()
    if value and value not in CHOICES:
        raise pytest.UsageError(f"envbox_unavailable = {value!r} (in {config.inipath}): it must be "
                                f"one of {', '.join(repr(c) for c in CHOICES)}")  # fmt: skip


def _reason(headline: str) -> str:
    return (f"pytest-envbox cannot start services here: {headline} (`envbox doctor` says why and "
            f"how to fix it)")  # fmt: skip


def before_start(request: pytest.FixtureRequest) -> None:
    """Called before a test's services start: once the host has refused, later tests do not try
    again (it would fail the same way): they skip, or error with one line."""
    config = request.config
    found = config.stash.get(_REFUSED, None)
    if found is None and not sys.platform.startswith("linux"):
        from pytest_envbox.kernel.refusal import platform_refusal

        refusal = platform_refusal()
        if mode(config) == "skip":
            config.stash[_REFUSED] = (refusal.kind, refusal.headline)
            found = config.stash[_REFUSED]
        else:
            raise HostUnsupported(refusal.block(), refusal=refusal.kind)
    if found is None:
        return
    if mode(config) == "skip":
        pytest.skip(_reason(found[1]))
    __tracebackhide__ = True
    raise HostUnsupported(f"pytest-envbox cannot start services here: {found[1]} (the error of "
                          f"{config.stash.get(_FIRST, 'an earlier test')} says why and how to fix it)",
                          refusal=found[0])  # fmt: skip


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A refusal met in setup or in the test (``envbox.start``): remembered; a skip in skip mode."""
    report = yield
    excinfo = call.excinfo
    if excinfo is None or not isinstance(excinfo.value, HostUnsupported) or excinfo.value.refusal is None:
        return report
    config = item.config
    headline = str(excinfo.value).split("\n", 1)[0].removeprefix("pytest-envbox cannot start services here: ")
    headline = headline.split(" (the error of ", 1)[0]
    if _REFUSED not in config.stash:
        config.stash[_REFUSED] = (excinfo.value.refusal, headline)
        config.stash[_FIRST] = item.nodeid
    if mode(config) == "skip" and report.failed:
        path, lineno, _ = item.reportinfo()
        report.outcome = "skipped"
        report.longrepr = (str(path), (lineno or 0) + 1, f"Skipped: {_reason(headline)}")
    return report
