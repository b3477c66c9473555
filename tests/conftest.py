"""Helpers shared by the test suites: kernel-state inspection used to prove nothing is left."""

from __future__ import annotations

import os
from importlib.metadata import entry_points

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
        from pytest_envbox import hostcheck

        tried = hostcheck.try_user_namespace()
        failed = [f"{step}: {err}" for step, err in tried.items() if err is not None]
        if failed:
            return "not root, and rootless mode cannot run here: " + "; ".join(failed)
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = can_sandbox()
    if reason is None:
        return
    for item in items:
        if "integration" in item.nodeid or "plugin" in item.nodeid:
            item.add_marker(pytest.mark.skip(reason=reason))
