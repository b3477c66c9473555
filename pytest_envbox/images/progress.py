"""What a pull shows while it runs: each layer's bytes, once the pull has taken a second.

A pull from a warm store takes milliseconds and shows nothing; one that downloads shows a status
line that front ends draw their own way (:class:`PullProgress` calls ``show(text, final)``): the
``envbox`` command rewrites one line of its terminal, the pytest plugin draws it as its terminal
reporter allows (see ``plugin/progress.py``). Thread-safe: layers download in parallel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["PullProgress", "Show", "human_bytes", "set_default_show"]

#: ``show(text, final)``: draw ``text``, replacing the previous one; ``final`` on the last call.
Show = Callable[[str, bool], None]

#: What pulls draw with when not told otherwise: the front end in charge sets it (the pytest
#: plugin at configure time, the ``envbox`` command before it pulls).
_default_show: Show | None = None


def set_default_show(show: Show | None) -> None:
    """Make ``show`` draw the progress of every pull that is given none (None: silence)."""
    global _default_show
    _default_show = show


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: sizes as ``ls -h`` and registries show them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class PullProgress:
    """The state of one pull, drawn through ``show`` at most every ``every`` seconds, and only
    once ``delay`` seconds have passed (a fast pull stays silent)."""

    def __init__(self, reference: str, show: Show | None, *, delay: float = 1.0,
                 every: float = 0.2) -> None:  # fmt: skip
        self.reference = reference
        self._show = show if show is not None else _default_show
        self._draw_lock = threading.Lock()  # one drawing at a time: layers report from threads
        self._delay = delay
        self._every = every
        self._start = time.monotonic()
        self._last = 0.0
        self._shown = False
        self._phase = "resolving"
        self._layers: dict[str, tuple[int, int]] = {}  # digest -> (done, total)
        self._lock = threading.Lock()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def phase(self, what: str) -> None:
        """What the pull does now: ``"resolving"``, ``"downloading"``, ``"unpacking"``."""
        with self._lock:
            self._phase = what
        self._maybe_draw()

    def layer(self, digest: str, done: int, total: int) -> None:
        """``done`` of ``total`` bytes of the blob ``digest`` are in the store."""
        with self._lock:
            self._layers[digest] = (done, total)
        self._maybe_draw()

    def text(self) -> str:
        """The status line: the reference, what is happening, the total and each layer's bytes."""
        with self._lock:
            layers = dict(self._layers)
            phase = self._phase
        done = sum(d for d, _ in layers.values())
        total = sum(t for _, t in layers.values())
        parts = [f"envbox: {phase} {self.reference}"]
        if layers:
            parts.append(f"{human_bytes(done)}/{human_bytes(total)} in {len(layers)} "
                         f"layer{'s' if len(layers) != 1 else ''}, {self.elapsed:.1f}s")  # fmt: skip
            each = [f"{d.split(':')[-1][:12]} "
                    + ("done" if t and n >= t else f"{human_bytes(n)}/{human_bytes(t)}")
                    for d, (n, t) in layers.items()]  # fmt: skip
            parts.append("[" + ", ".join(each) + "]")
        else:
            parts.append(f"{self.elapsed:.1f}s")
        return " ".join(parts)

    def _maybe_draw(self) -> None:
        if self._show is None:
            return
        now = time.monotonic()
        if now - self._start < self._delay or now - self._last < self._every:
            return
        with self._draw_lock:
            self._last = now
            self._shown = True
            self._show(self.text(), False)

    def finish(self, summary: str) -> None:
        """The pull is over: replace the status line by ``summary`` if one was drawn."""
        if self._show is not None and self._shown:
            with self._draw_lock:
                self._show(f"envbox: {summary} ({self.elapsed:.1f}s)", True)
