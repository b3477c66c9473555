"""The engine's wait board (engine/waiting.py): what it tells a front end, and when it says nothing.

No service runs here: the waits are blocks of the test's own, and the test waits on what the
board draws (an event set by the fake front end), never on a clock.
"""

from __future__ import annotations

import threading

import pytest

from pytest_envbox.engine import waiting
from pytest_envbox.engine.waiting import Wait, WaitBoard, status_text


class Recorder:
    """A front end that keeps every call; ``drawn`` is set at the first update."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.drawn = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, text: str, final: bool) -> None:
        with self.lock:
            self.calls.append((text, final))
        if not final:
            self.drawn.set()


def test_the_status_names_each_service_its_probe_and_the_time_so_far() -> None:
    waits = [Wait("db", "tcp port 5432 accepts connections", since=10.0, timeout=30.0),
             Wait("api", "GET http://api:8000/health returns 2xx", since=9.5, timeout=2.5)]  # fmt: skip
    assert status_text(waits, now=12.0) == (
        "envbox: waiting for api: GET http://api:8000/health returns 2xx (2.5s of 2.5s); "
        "db: tcp port 5432 accepts connections (2.0s of 30s)")  # fmt: skip
    assert status_text([Wait("job", "completion", since=0.0)], now=1.25) == (
        "envbox: waiting for job: completion (1.2s)")  # fmt: skip


def test_a_slow_wait_is_shown_then_ended_with_its_outcome() -> None:
    shown = Recorder()
    board = WaitBoard(shown, delay=0.05, every=0.01)
    with board.waiting("web", "tcp port 8000 accepts connections", 30.0):
        assert shown.drawn.wait(30), "a wait longer than the delay was never shown"
    texts = [t for t, final in shown.calls if not final]
    assert texts and all(t.startswith("envbox: waiting for web: tcp port 8000 accepts connections (")
                         and t.endswith("s of 30s)") for t in texts), shown.calls  # fmt: skip
    last, final = shown.calls[-1]
    assert final and last.startswith("envbox: web ready after "), shown.calls
    assert sum(f for _, f in shown.calls) == 1
    n = len(shown.calls)
    with board.waiting("web", "again", 1.0):  # a new episode, as fast as it can be: silent
        pass
    assert len(shown.calls) == n


def test_a_fast_wait_shows_nothing() -> None:
    shown = Recorder()
    board = WaitBoard(shown, delay=3600.0)
    for _ in range(3):
        with board.waiting("web", "tcp port 8000 accepts connections", 30.0):
            pass
    assert shown.calls == []


def test_a_failed_wait_says_so_and_services_waiting_together_share_one_line() -> None:
    shown = Recorder()
    board = WaitBoard(shown, delay=0.05, every=0.01)
    other_in, other_done, release = threading.Event(), threading.Event(), threading.Event()

    def other() -> None:
        with board.waiting("db", "tcp port 5432 accepts connections", 30.0):
            other_in.set()
            release.wait(30)
        other_done.set()

    t = threading.Thread(target=other)
    t.start()
    assert other_in.wait(30)
    try:
        with pytest.raises(RuntimeError), board.waiting("api", "GET http://api:8000/ returns 2xx", 30.0):
            assert shown.drawn.wait(30)
            raise RuntimeError("the service exited")
    finally:
        release.set()
        t.join(30)
    assert other_done.is_set()
    both = [t for t, f in shown.calls if not f and "api:" in t and "db:" in t]
    assert both, shown.calls
    text, final = shown.calls[-1]
    assert final and sum(f for _, f in shown.calls) == 1, shown.calls
    # the final call, made when the last wait ended, tells how each shown wait ended
    assert text.startswith("envbox: api failed after ") and ", db ready after " in text, text


def test_without_a_front_end_nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waiting, "_default_show", None)
    board = WaitBoard()
    with board.waiting("web", "tcp port 8000 accepts connections", 30.0):
        pass
    assert board._thread is None  # no status thread for nobody


def test_the_default_front_end_is_put_back() -> None:
    shown = Recorder()
    before = waiting.set_default_show(shown)
    try:
        assert waiting.set_default_show(before) is shown
    finally:
        waiting.set_default_show(before)


def test_a_front_end_that_fails_fails_no_start_and_the_status_goes_on() -> None:
    calls: list[bool] = []
    drawn = threading.Event()

    def broken(text: str, final: bool) -> None:
        calls.append(final)
        drawn.set()
        raise BrokenPipeError("the terminal is gone")

    board = WaitBoard(broken, delay=0.02, every=0.01)
    for _ in range(2):  # the second wait is shown too: the status thread survived the first
        drawn.clear()
        with board.waiting("web", "tcp port 8000 accepts connections", 30.0):
            assert drawn.wait(30)
    assert calls.count(True) == 2 and calls.count(False) >= 2
