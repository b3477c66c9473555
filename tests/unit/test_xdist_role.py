"""The plugin asks pytest-xdist, when installed, whether this process is one of its workers."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from pytest_envbox import plugin


def test_without_xdist_installed_no_process_is_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xdist", None)  # `import xdist` raises ImportError
    session = SimpleNamespace(config=SimpleNamespace(workerinput={"workerid": "gw0"}))
    assert plugin._is_xdist_worker(session) is False  # type: ignore[arg-type]


def test_with_xdist_a_worker_is_what_xdist_says() -> None:
    pytest.importorskip("xdist")
    worker = SimpleNamespace(config=SimpleNamespace(workerinput={"workerid": "gw0"}))
    controller = SimpleNamespace(config=SimpleNamespace())
    assert plugin._is_xdist_worker(worker) is True  # type: ignore[arg-type]
    assert plugin._is_xdist_worker(controller) is False  # type: ignore[arg-type]
