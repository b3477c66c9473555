"""Helpers shared by the test suites: kernel-state inspection used to prove nothing is left."""

from __future__ import annotations

import importlib.util
import os
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

import pytest

#: ``-p pytest_envbox.plugin`` when the package is not installed (running from a checkout); an
#: installed package loads through its pytest11 entry point, and loading it twice is an error.
PLUGIN_ARGS: list[str] = (
    [] if any(ep.value == "pytest_envbox.plugin" for ep in entry_points(group="pytest11"))
    else ["-p", "pytest_envbox.plugin"]
)


def can_sandbox() -> str | None:
    """Why sandboxes cannot run here, or None when they can."""
    if not os.path.exists("/proc/self/ns/pid"):
        return "not Linux, or no namespaces"
    if os.geteuid() != 0:
        from pytest_envbox.kernel import hostcheck

        tried = hostcheck.try_user_namespace()
        failed = [f"{step}: {err}" for step, err in tried.items() if err is not None]
        if failed:
            return "not root, and rootless mode cannot run here: " + "; ".join(failed)
    return None


def cgroups_problem() -> str | None:
    """Why services cannot get cgroups in this run (rootless on cgroup v1, say), or None."""
    global _cgroups_problem
    if _cgroups_problem is None:
        from pytest_envbox.cli import cgroup_check
        from pytest_envbox.engine.client import rootless

        good, text = cgroup_check(os.geteuid() == 0)
        _cgroups_problem = "" if good or not rootless() else text
    return _cgroups_problem or None


_cgroups_problem: str | None = None


def in_ci() -> bool:
    """``$CI`` set to a true value, read as the plugin reads it (one definition: its own)."""
    from pytest_envbox.plugin.unavailable import _ci

    return _ci()


def need_program(program: str, package: str) -> str:
    """The path of ``program`` (a name on PATH, or a glob of absolute paths); when it is missing,
    the test is skipped naming the Debian package that has it, as on a new machine that has not
    installed the servers the tests run (README). In CI, where .ci/run installs every one, it
    fails instead: a skip there would hide a missing install."""
    import glob
    import shutil

    found = shutil.which(program) if not program.startswith("/") else next(
        (p for p in sorted(glob.glob(program)) if os.access(p, os.X_OK)), None)  # fmt: skip
    if found:
        return found
    why = f"{program} is not installed (apt-get install {package})"
    if in_ci():
        pytest.fail(f"{why}; .ci/run installs it", pytrace=False)
    pytest.skip(why)


#: Debian's PostgreSQL server, for need_program
POSTGRES = "/usr/lib/postgresql/*/bin/postgres"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_cgroups: the feature needs cgroups; where a rootless run cannot have "
        "them (cgroup v1), the test must raise HostUnsupported (a strict xfail that shows it)")
    config.addinivalue_line(
        "markers", "needs_root(why): the test's own mechanics need root (not the feature's)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    from pytest_envbox import HostUnsupported

    reason = can_sandbox()
    for item in items:
        if reason is not None and ("integration" in item.nodeid or "plugin" in item.nodeid):
            item.add_marker(pytest.mark.skip(reason=reason))
            continue
        root = item.get_closest_marker("needs_root")
        if root is not None and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason=f"needs root: {root.args[0]}"))
        if item.get_closest_marker("needs_cgroups") is not None and cgroups_problem():
            # Not a silent skip: the test runs, and must fail with HostUnsupported, whose
            # message the report shows (-rx).
            why = (cgroups_problem() or "").rsplit("; ", 1)[-1]
            item.add_marker(pytest.mark.xfail(raises=HostUnsupported, strict=True,
                                              reason=f"HostUnsupported, as it must be: {why}"))  # fmt: skip


@pytest.fixture(autouse=True)
def _remove_rootless_stores(request: pytest.FixtureRequest) -> object:
    """Rootless, an image store holds files owned by the user's subordinate ids, which the user
    cannot remove outside the user namespace: pytest's own clean-up of old temp dirs would fail
    on a test's store. Each store a test made in its ``tmp_path`` is removed after the test, by
    the store's own code (as root of the user namespace), as `envbox prune` removes layers."""
    yield
    tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    if os.geteuid() == 0 or tmp is None or not tmp.is_dir():
        return
    stores = [p for p in (tmp, *tmp.iterdir()) if p.is_dir() and (p / "layers").is_dir()]
    if stores:
        from pytest_envbox.images.store import Store

        for path in stores:
            Store(path)._in_namespace("remove_trees", {"paths": [str(path)]}, None)


def load_by_path(name: str, path: Path) -> ModuleType:
    """A module from a file outside any package (benchmarks/, tools/)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
