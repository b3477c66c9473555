"""Waiting for a condition, with a deadline on the monotonic clock: :class:`Deadline` and
:func:`wait_until`.

:func:`wait_until` checks a condition, then sleeps on an event that the state change sets (a
service exiting), or, without one, for a pause that grows from 1 to 20 ms, so a wait ends as soon
as its answer is known rather than at a coarse poll. Through it go the engine's waits on what a
service does (readiness probes and ``ServiceHandle.wait_for_log``, in
:mod:`pytest_envbox.engine.readiness`) and the kernel layer's waits for a cgroup to empty, freeze,
thaw or become removable (:mod:`pytest_envbox.kernel.cgroups`, at fixed 0.5-1 ms intervals).

Other waits do not:

- ``ServiceHandle.stop()``, ``kill()`` and teardown wait on the service's exit event itself
  (``threading.Event.wait`` with the grace as its timeout: no loop to write);
- ``engine.client.SupervisorClient.call`` waits for the supervisor's
  answer with no deadline: the answer comes, or the supervisor's death wakes every caller;
- the supervisor's threads, ``envbox up`` (until Ctrl-C) and ``envbox clean`` (on a pidfd,
  with a timeout) wait in their own ways.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "FIRST_INTERVAL",
    "MAX_INTERVAL",
    "Deadline",
    "wait_until",
]

T = TypeVar("T")

#: First and largest pause between two checks of a condition that has no event of its own.
FIRST_INTERVAL = 0.001
MAX_INTERVAL = 0.02


class Deadline:
    """A point in time on the monotonic clock; ``None`` seconds means never."""

    __slots__ = ("_at",)

    def __init__(self, seconds: float | None) -> None:
        self._at = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        return None if self._at is None else max(0.0, self._at - time.monotonic())


def wait_until(
    check: Callable[[], T | None],
    deadline: Deadline,
    *,
    wake: threading.Event | None = None,
    interval: float | None = None,
    first: float = FIRST_INTERVAL,
) -> T | None:
    """Call ``check`` until it returns something other than None, or the deadline passes.

    Between checks, sleep on ``wake`` (set by whoever changes the state being waited for) for
    ``interval`` seconds, or, when no interval is given, for a pause that starts at 1 ms and grows
    to 20 ms (``first``: where it starts): quick answers are seen at once, long waits stay cheap.
    Returns None on timeout.
    """
    pause = interval if interval is not None else first
    while True:
        result = check()
        if result is not None:
            return result
        left = deadline.remaining()
        if left is not None and left <= 0:
            return None
        step = pause if left is None else min(pause, left)
        if wake is not None:
            wake.wait(step)
        else:
            time.sleep(step)
        if interval is None:
            pause = min(pause * 2, MAX_INTERVAL)
