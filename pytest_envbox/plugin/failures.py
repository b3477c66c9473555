"""How pytest-envbox's errors read in pytest's report: the message, not the plugin's insides.

Every :class:`~pytest_envbox.errors.EnvboxError` message is written to be read without a traceback
(it names the service, the key, the fix), so for these errors the frames of pytest-envbox (and of
pytest and pluggy around them) are dropped from the report, and the short test summary line shows
the message instead of ``pytest_envbox.errors.ConfigE...``. ``--full-trace`` shows every frame.

An error in the project's own declarations (``pyproject.toml``, ``envbox.toml``, the compose and
Kubernetes files, the ``pytest_envbox_services`` hooks) concerns every test that needs a service,
so it is reported once, by the first test that needed it, and the run stops there with exit code 4
(``pytest.ExitCode.USAGE_ERROR``, as pytest's own configuration errors). It is found when a test
first needs a service, not at collection: compose files may interpolate variables that a session
fixture sets, and a services hook may start a registry, which collection (``--collect-only``) must
not. Errors of one test (an inline ``Service`` of its marker, a service that fails to start) stay
that test's error.

Registered as a plugin of its own by :func:`pytest_envbox.plugin.pytest_configure`.
"""

from __future__ import annotations

import re
from collections.abc import Generator
from pathlib import Path
from types import TracebackType
from typing import Any

import _pytest
import pluggy
import pytest
from _pytest._code.code import ExceptionChainRepr, ReprFileLocation, Traceback

import pytest_envbox
from pytest_envbox.errors import ConfigError, EnvboxError

# (from _pytest: pytest has no public names for the classes of ExceptionInfo.traceback and of a
# report's longrepr; they are stable since pytest 5, and pytest-xdist relies on them too)

__all__ = [
    "pytest_make_collect_report",
    "pytest_runtest_makereport",
    "pytest_sessionfinish",
    "pytest_testnodedown",
    "stop_for_project_error",
]

#: why the run was stopped: the project's configuration error (its first line)
_PROJECT_ERROR = pytest.StashKey[str]()
#: frames from these directories are not shown for an EnvboxError (without --full-trace)
_HIDDEN = tuple(Path(m.__file__ or "").parent for m in (pytest_envbox, _pytest, pluggy))
#: how pytest spells our exceptions at the start of a message: a prefix that hides the message
_QUALIFIED = re.compile(r"^pytest_envbox\.errors\.\w+: ")


def stop_for_project_error(request: pytest.FixtureRequest, error: ConfigError) -> None:
    """Stop the run after this test: the project's declarations are invalid, so every other test
    that needs a service would fail the same way (the error is reported once, by this test)."""
    first_line = str(error).split("\n", 1)[0]
    request.config.stash.setdefault(_PROJECT_ERROR, first_line)
    if not request.session.shouldstop:
        request.session.shouldstop = "pytest-envbox: the project's configuration is invalid (above)"


def _without_ours(tb: TracebackType | None) -> TracebackType | None:
    """The traceback without the frames of pytest-envbox, pytest and pluggy.

    A new chain of traceback objects, not a filtered list: pytest cuts a test's traceback at the
    test function by walking the raw chain from there, which would bring the frames back.
    """
    kept = []
    while tb is not None:
        path = Path(tb.tb_frame.f_code.co_filename)
        if not any(path.is_relative_to(d) for d in _HIDDEN):
            kept.append(tb)
        tb = tb.tb_next
    chain = None
    for t in reversed(kept):
        chain = TracebackType(chain, t.tb_frame, t.tb_lasti, t.tb_lineno)
    return chain


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """For an EnvboxError: the user's frames only (none, when it came from the plugin's fixture),
    and the message as the short summary's text."""
    excinfo = call.excinfo
    if excinfo is None or not isinstance(excinfo.value, EnvboxError):
        return (yield)
    config = item.config
    # (--tb=native prints the raw chain from its first frame on: left as it is)
    if not config.getoption("fulltrace") and config.getoption("tbstyle") != "native":
        kept = _without_ours(excinfo.tb)
        excinfo.traceback = Traceback(kept) if kept is not None else Traceback([])
    report = yield
    _, lineno, _ = item.location
    _show_message(report, str(excinfo.value), str(item.path), (lineno or 0) + 1)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, Any]:
    """A declaration that fails at import (``Service(...)`` in a marker): the message, not the
    class's module path, in the short summary."""
    report = yield
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None and _QUALIFIED.match(crash.message):
        crash.message = _QUALIFIED.sub("", crash.message)
    return report


def _show_message(report: pytest.TestReport, message: str, path: str, lineno: int) -> None:
    """Make ``message`` the report's crash line (the short summary's text): pytest would write
    ``pytest_envbox.errors.ConfigError: ...``, or nothing when every frame was the plugin's."""
    longrepr = report.longrepr
    if not isinstance(longrepr, ExceptionChainRepr):
        return
    crash = longrepr.reprcrash
    if crash is None:
        crash = ReprFileLocation(path, lineno, message)
    else:
        crash.message = message
    longrepr.reprcrash = crash
    # pytest-xdist rebuilds the report from its chain: the crash line must be there too
    *earlier, (traceback, _, description) = longrepr.chain
    longrepr.chain = [*earlier, (traceback, crash, description)]


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workeroutput")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist controller: a worker stopped for the project's configuration error."""
    sent = getattr(node, "workeroutput", {}).get("envbox_project_error")
    if sent:
        node.config.stash.setdefault(_PROJECT_ERROR, sent)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Exit code 4 (usage error) when the project's configuration stopped the run."""
    config = session.config
    error = config.stash.get(_PROJECT_ERROR, None)
    if error is None:
        return
    if _is_xdist_worker(config):
        config.workeroutput["envbox_project_error"] = error  # type: ignore[attr-defined]
        return
    session.exitstatus = pytest.ExitCode.USAGE_ERROR
