"""What the engine is waiting for, told to whoever watches: a status once a wait takes a second.

A service that needs seconds to become ready would otherwise show seconds of nothing. Each
readiness wait (``ServiceHandle._wait_ready``) is put on a :class:`WaitBoard` for its duration;
once the oldest wait has lasted ``delay`` seconds (1 s), the board calls ``show(text, final)``
(the :data:`~pytest_envbox.images.progress.Show` protocol of pull progress) with what is awaited,
the probe and the time so far, then again every ``every`` seconds; when the last wait ends, one
final call says how it ended. A fast start calls nothing.

Front ends choose how to draw it, as for pulls: the pytest plugin as a status line of its terminal
(``plugin/status.py``), ``envbox up`` on its standard error; without a front end
(:func:`set_default_show` never called, or an xdist worker) nothing is drawn and no thread runs.

The updates come from one daemon thread, started at the first wait that has someone to show it
to; the final call is made by the thread that ends the last wait, before that wait returns, so
nothing is drawn once the start is over (the test's own output never meets a stale status).

The engine also logs, with :mod:`logging` under ``pytest_envbox.*`` at INFO: each environment's
start and end (``pytest_envbox.engine.environment``), each service's start, stop and exit
(``.handle``), each wait and how it ended (``.readiness``). It never prints.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pytest_envbox.images.progress import Show

__all__ = ["BOARD", "Wait", "WaitBoard", "set_default_show", "status_text"]

_log = logging.getLogger(__name__)

#: How long a wait runs before it is shown, and how often the status is drawn again after that.
DELAY = 1.0
EVERY = 0.2


@dataclass(frozen=True)
class Wait:
    """One wait in progress: ``service`` waits for ``what`` (a probe's description) since
    ``since`` (monotonic clock), for at most ``timeout`` seconds (None: no limit known)."""

    service: str
    what: str
    since: float
    timeout: float | None = None

    def elapsed(self, now: float) -> float:
        return max(0.0, now - self.since)


def _seconds(s: float) -> str:
    return f"{s:.0f}s" if s == int(s) else f"{s:g}s"


def status_text(waits: list[Wait], now: float) -> str:
    """``envbox: waiting for web: tcp port 8000 accepts connections (3.0s of 30s)``; several
    waits (services of one level start side by side) are joined with ``; ``, oldest first."""
    parts = []
    for w in sorted(waits, key=lambda w: w.since):
        limit = "" if w.timeout is None else f" of {_seconds(w.timeout)}"
        parts.append(f"{w.service}: {w.what} ({w.elapsed(now):.1f}s{limit})")
    return "envbox: waiting for " + "; ".join(parts)


class WaitBoard:
    """The waits in progress in this process, and the thread that shows them once they are slow.

    ``show`` draws its status; without one, the process's default (:func:`set_default_show`),
    looked up as each wait begins, so that the front end may set it after the board is made.
    Thread-safe: services of one level wait side by side, each in its own thread.
    """

    def __init__(self, show: Show | None = None, *, delay: float = DELAY, every: float = EVERY) -> None:
        self._fixed_show = show
        self.delay = delay
        self.every = every
        self._ids = itertools.count()
        self._waits: dict[int, Wait] = {}
        self._show: Show | None = None  # the one the shown waits draw with
        self._ended: list[str] = []  # how the waits that ended while shown ended
        self._shown = False
        self._cond = threading.Condition()
        # Held while drawing, and while a wait ends: an update never comes after the final call.
        # Taken before ``_cond`` wherever both are held.
        self._draw_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _current_show(self) -> Show | None:
        return self._fixed_show if self._fixed_show is not None else _default_show

    @contextlib.contextmanager
    def waiting(self, service: str, what: str, timeout: float | None = None) -> Iterator[Wait]:
        """Show ``service`` waiting for ``what`` while the block runs (if it runs long); the
        final status says whether it ended well (``ready``) or with an exception (``failed``)."""
        w = Wait(service, what, time.monotonic(), timeout)
        key = self._begin(w)
        ok = False
        try:
            yield w
            ok = True
        finally:
            self._end(key, w, "ready" if ok else "failed")

    def _begin(self, w: Wait) -> int | None:
        show = self._current_show()
        if show is None:
            return None
        with self._cond:
            key = next(self._ids)
            if not self._waits:
                self._show = show
            self._waits[key] = w
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="envbox-wait-status", daemon=True)
                self._thread.start()
            self._cond.notify()
        return key

    def _end(self, key: int | None, w: Wait, outcome: str) -> None:
        if key is None:
            return
        now = time.monotonic()
        with self._draw_lock:
            with self._cond:
                self._waits.pop(key, None)
                if not self._shown:
                    return
                self._ended.append(f"{w.service} {outcome} after {w.elapsed(now):.1f}s")
                if self._waits:
                    return
                text = "envbox: " + ", ".join(self._ended)
                show, self._shown, self._ended = self._show, False, []
            if show is not None:
                _call(show, text, True)

    def _run(self) -> None:
        """The status thread: sleeps until the oldest wait is ``delay`` old, then draws every
        ``every`` seconds until no wait is left; then sleeps until the next one."""
        while True:
            with self._cond:
                while True:
                    if not self._waits:
                        self._cond.wait()
                        continue
                    if self._shown:
                        break
                    due = min(w.since for w in self._waits.values()) + self.delay
                    now = time.monotonic()
                    if due <= now:
                        break
                    self._cond.wait(due - now)
            self._draw()
            with self._cond:
                # Woken early only by a new wait or the end of all: either way, look again.
                if self._waits:
                    self._cond.wait(self.every)

    def _draw(self) -> None:
        with self._draw_lock:
            with self._cond:
                if not self._waits:
                    return
                now = time.monotonic()
                if not self._shown and min(w.since for w in self._waits.values()) + self.delay > now:
                    return
                text = status_text(list(self._waits.values()), now)
                self._shown = True
                show = self._show
            if show is not None:
                _call(show, text, False)


def _call(show: Show, text: str, final: bool) -> None:
    """Draw; a front end that fails (its terminal gone) must not fail a start nor stop the
    status thread."""
    try:
        show(text, final)
    except Exception:
        _log.debug("drawing the wait status failed", exc_info=True)

#: What starts draw with when not told otherwise: the front end in charge sets it (the pytest
#: plugin at configure time, ``envbox up`` before it starts anything).
_default_show: Show | None = None


def set_default_show(show: Show | None) -> Show | None:
    """Make ``show`` draw the status of every slow wait of this process (None: silence); return
    the one it replaces, for a front end to put back when it is done (a pytest run inside a
    pytest run, as pytester does, ends before the outer one)."""
    global _default_show
    previous, _default_show = _default_show, show
    return previous


#: The process's board: every ``ServiceHandle`` waits on it.
BOARD = WaitBoard()
