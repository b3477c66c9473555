"""Which tests used each environment, for ``--envbox-report``.

Read at the end of the run from each test's item (the ``envbox`` fixture lists there the
environments it gave the test, ``fixtures._USED``), so nothing is recorded while tests run: a
function-scoped environment has its one test, a shared one (``scope="module"``, ...) every test
of its scope that used it, in the order they ran. An xdist worker sends its environments with
their tests to the controller, which writes the report.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from pytest_envbox.engine.environment import Environment
from pytest_envbox.plugin import fixtures

__all__ = ["by_environment", "reports"]


def by_environment(items: Iterable[pytest.Item]) -> dict[str, list[str]]:
    """Environment id -> node ids of the tests that used it (each once, in run order)."""
    tests: dict[str, list[str]] = {}
    for item in items:
        for env in item.stash.get(fixtures._USED, []):
            used = tests.setdefault(env.id, [])
            if item.nodeid not in used:
                used.append(item.nodeid)
    return tests


def reports(envs: Sequence[Environment], items: Iterable[pytest.Item]) -> list[dict[str, Any]]:
    """Each environment's :meth:`~pytest_envbox.Environment.report`, with ``"tests"``."""
    tests = by_environment(items)
    out = []
    for env in envs:
        r = env.report()
        out.append({"id": r["id"], "tests": tests.get(env.id, []), **r})  # after the id, for readers
    return out
