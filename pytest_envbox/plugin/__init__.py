"""The pytest front end: options, the marker, hooks. Thin by design: the work is in the engine.

The ``envbox`` fixture lives in :mod:`pytest_envbox.plugin.fixtures`, the hookspecs in
:mod:`pytest_envbox.plugin.hookspecs`; report sections, the summary and ``--envbox-report`` are
made here from what the fixture recorded in the item's and the config's stash.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import Any

import pytest

from pytest_envbox.engine import client, report
from pytest_envbox.images.progress import set_default_show
from pytest_envbox.plugin import failures, fixtures, hookspecs, progress, status, testids, unavailable

# The fixtures, registered with the plugin (the autouse one is named _envbox_auto in pytest).
from pytest_envbox.plugin.fixtures import envbox, envbox_autostart  # noqa: F401

__all__ = [
    "pytest_addhooks",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_runtest_makereport",
    "pytest_sessionfinish",
    "pytest_sessionstart",
    "pytest_terminal_summary",
    "pytest_testnodedown",
]

def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("envbox", "sandboxed services (pytest-envbox)")
    group.addoption("--envbox-logs", choices=("on-failure", "always", "never"),
                    default="on-failure",
                    help="attach service logs to test reports (default: on-failure)")  # fmt: skip
    group.addoption("--envbox-report", metavar="PATH", default=None,
                    help="write a JSON report of every environment to PATH")  # fmt: skip
    group.addoption("--envbox-keep", action="store_true", default=False,
                    help="on failure, keep the environment and print how to enter it")  # fmt: skip
    group.addoption("--envbox-rootless", choices=("auto", "yes", "no"), default="auto",
                    help="run services in a user namespace (default auto: when not root)")  # fmt: skip
    unavailable.add_options(parser, group)


def pytest_configure(config: pytest.Config) -> None:
    client.set_rootless_mode(config.getoption("envbox_rootless"))
    set_default_show(progress.terminal_show(config))
    status.install(config)  # what a slow start waits for (engine/waiting.py)
    unavailable.check(config)
    config.pluginmanager.register(failures, "envbox-failures")
    config.pluginmanager.register(unavailable, "envbox-unavailable")
    config.addinivalue_line(
        "markers",
        "envbox(*services, topology=None, scope='function'): start these services (names from "
        "the project config, or Service objects) in sandboxes for the test; see pytest-envbox.",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Check every envbox marker's arguments once, at collection.

    A bad marker fails its test at setup (from the ``_envbox_auto`` fixture) with a message that
    names the test, rather than stopping the whole collection.
    """
    for item in items:
        marker = item.get_closest_marker("envbox")
        if marker is None:
            continue
        try:
            fixtures.parse_marker(marker)
        except (TypeError, ValueError) as e:
            item.stash[fixtures.BAD_MARKER] = f"{item.nodeid}: bad envbox marker: {e}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and item.config.getoption("envbox_keep"):
        fixtures.keep_environments(item, f"{item.nodeid} failed at {report.when}")
    if report.failed:
        # An OOM kill is usually the real cause of a failure that shows as a refused connection.
        notes = fixtures.oom_notes(item)
        if notes:
            report.sections.append(("envbox: OOM", "\n".join(notes)))
    mode = item.config.getoption("envbox_logs")
    if mode == "never" or (mode == "on-failure" and not report.failed):
        return report
    for name, text in fixtures.log_sections(item):
        report.sections.append((f"envbox: {name}", text))
    return report



_WORKER_REPORTS = pytest.StashKey[list[dict[str, Any]]]()
#: whether this process is a pytest-xdist worker, which leaves the reporting to the controller
_XDIST_WORKER = pytest.StashKey[bool]()


def _is_xdist_worker(session: pytest.Session) -> bool:
    """pytest-xdist's own answer (``xdist.is_xdist_worker``); False when xdist is not installed."""
    try:
        import xdist
    except ImportError:
        return False
    return bool(xdist.is_xdist_worker(session))


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_XDIST_WORKER] = _is_xdist_worker(session)


def _reports(config: pytest.Config, session: pytest.Session | None = None) -> list[dict[str, Any]]:
    """This process's environments, and (on an xdist controller) those its workers sent; given
    the session, each with the node ids of the tests that used it (``"tests"``)."""
    envs = config.stash.get(fixtures.ENVIRONMENTS, [])
    own = [env.report() for env in envs] if session is None else testids.reports(envs, session.items)
    return own + config.stash.get(_WORKER_REPORTS, [])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist controller: collect a finished worker's environments (see pytest_sessionfinish)."""
    sent = getattr(node, "workeroutput", {}).get("envbox_reports")
    if sent:
        node.config.stash.setdefault(_WORKER_REPORTS, []).extend(json.loads(sent))


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if config.stash.get(_XDIST_WORKER, False):  # the controller reports for all
        # xdist sends a worker's ``config.workeroutput`` to the controller's testnodedown hook.
        workeroutput: dict[str, Any] = config.workeroutput  # type: ignore[attr-defined]
        workeroutput["envbox_reports"] = json.dumps(_reports(config, session))
        return
    path = config.getoption("envbox_report")
    if path:
        with open(path, "w") as f:
            json.dump({"environments": _reports(config, session)}, f, indent=2)
            f.write("\n")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Per service: starts, median time to ready, peak memory against its limit, cpu, OOM kills."""
    if config.stash.get(_XDIST_WORKER, False):
        return
    rows = report.totals(_reports(config))
    if not rows:
        return
    terminalreporter.write_sep("-", "envbox services")
    for line in report.table(rows):
        terminalreporter.write_line(line)
    path = config.getoption("envbox_report")
    if path:
        terminalreporter.write_line(f"envbox: report written to {path}")
    kept = report.kept(_reports(config))
    if kept:
        terminalreporter.write_sep("-", "envbox: kept environments (--envbox-keep)")
        for line in kept:
            terminalreporter.write_line(line)
