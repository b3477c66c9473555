"""The slow-start status in pytest's terminal: what a test's setup is waiting for.

The engine's :data:`~pytest_envbox.engine.waiting.BOARD` calls ``show(text, final)`` once a
readiness wait has lasted a second, then every 0.2 s, then once when the last wait is over
(``final``). This module draws those calls without breaking pytest's own output:

- On a terminal, one line below the current one, rewritten in place (carriage return and
  erase-line, as pytest-xdist draws its status), and cleared at the end, the cursor put back
  where pytest left it: the dots or the verbose line go on as if nothing had been drawn. It is
  written raw, past pytest's terminal writer, whose idea of the current line stays true.
- Elsewhere (a CI log, pytester, output piped), or when something else may write to the terminal
  meanwhile (live logging, ``-s``): whole lines, the first after a second, then at most one every
  :data:`LINE_EVERY` seconds, and a last one saying how the wait ended. They start on a fresh line
  and, once over, the test file's name (or the verbose test line) is written again so that its
  results continue on a whole line of their own.

``-qq`` shows nothing (the engine's log still has everything: ``--log-cli-level=INFO``); xdist
workers show nothing either, their terminal being nobody's.

Drawing happens in the engine's status thread while the test's own thread waits for its services.
Capture is suspended for the drawing (as live logging does), and the drawing holds the live-log
handler's lock, so that a log record emitted meanwhile by another thread is never interleaved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_envbox.engine import waiting
from pytest_envbox.images.progress import Show

__all__ = ["LINE_EVERY", "install", "terminal_status"]

#: Where the status is drawn as lines: at most one every so many seconds.
LINE_EVERY = 3.0


def install(config: pytest.Config) -> None:
    """Draw the engine's slow waits on this run's terminal until the run ends (then put back
    whatever drew them before)."""
    previous = waiting.set_default_show(terminal_status(config))

    def restore() -> None:
        waiting.set_default_show(previous)

    config.add_cleanup(restore)


def terminal_status(config: pytest.Config) -> Show | None:
    """A ``show(text, final)`` for the engine's waits, drawing on pytest's terminal reporter
    (looked up when drawing: it may register after this plugin); None when nothing is to be
    drawn (``-qq``, an xdist worker)."""
    if hasattr(config, "workerinput") or int(config.getoption("verbose", 0) or 0) <= -2:
        return None
    line = _StatusLine(config)
    return line.show


class _StatusLine:
    """One status episode at a time: from the first drawing to the final call."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.active = False
        self.raw = False  # this episode is drawn in place (a terminal), not as lines
        self.column = 0  # raw: where pytest's cursor was when the episode began
        self.moved = False  # raw: the status went on a line below pytest's
        self.saved: Any = None  # lines: the reporter's currentfspath, written again at the end
        self.last = 0.0

    def show(self, text: str, final: bool) -> None:
        tr: Any = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is None:  # -p no:terminal
            return
        capman: Any = self.config.pluginmanager.get_plugin("capturemanager")
        with _live_log_lock(self.config), \
                (capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()):  # fmt: skip
            if self._raw_possible(tr):
                self._draw_raw(tr, text, final)
            else:
                self._draw_lines(tr, text, final)

    def _live_log(self) -> bool:
        """Whether pytest shows log records as they come (``--log-cli-level``, ``log_cli``)."""
        if self.config.getoption("log_cli_level", None) is not None:
            return True
        try:
            return bool(self.config.getini("log_cli"))
        except ValueError:  # -p no:logging: no such setting
            return False

    def _raw_possible(self, tr: Any) -> bool:
        if self.active:
            return self.raw
        live_log = self._live_log()
        capture_off = self.config.getoption("capture", "fd") == "no"
        tw = getattr(tr, "_tw", None)
        return (bool(getattr(tr, "isatty", False)) and not live_log and not capture_off
                and tw is not None and tw.width_of_current_line >= 0)  # fmt: skip

    def _draw_raw(self, tr: Any, text: str, final: bool) -> None:
        tw = tr._tw
        if not self.active:
            if final:
                return
            self.active, self.raw = True, True
            self.column = tw.width_of_current_line
            self.moved = self.column > 0
            if self.moved:
                tw.write_raw("\n")
        if not final:
            width = max(10, tw.fullwidth - 1)
            tw.write_raw("\r\x1b[K" + (text if len(text) <= width else text[: width - 3] + "..."),
                         flush=True)  # fmt: skip
            return
        # Clear it and put the cursor back where pytest's writer believes it is.
        back = f"\x1b[A\x1b[{self.column + 1}G" if self.moved else ""
        tw.write_raw("\r\x1b[K" + back, flush=True)
        self.active = False

    def _draw_lines(self, tr: Any, text: str, final: bool) -> None:
        now = time.monotonic()
        if not self.active:
            if final:
                return
            self.active, self.raw, self.last = True, False, now
            self.saved = tr.currentfspath
            tw = tr._tw
            if tw.width_of_current_line != 0:  # on a line of pytest's (dots, a test name)
                tw.line()
            tr.currentfspath = None
            self._line(tr, text)
            return
        if not final:
            if now - self.last >= LINE_EVERY:
                self.last = now
                self._line(tr, text)
            return
        self._line(tr, text)
        self.active = False
        saved, self.saved = self.saved, None
        if self._live_log():
            # Records follow on lines of their own, and pytest writes the result on its own line
            # after them, as it does whenever records were shown: let it.
            tr.currentfspath = saved
        elif isinstance(saved, Path):  # the file whose dots were being written
            tr.write(os.path.relpath(saved, tr.startpath) + " ", flush=True)
            tr.currentfspath = saved
        elif isinstance(saved, str):  # -v: the test's line, waiting for its PASSED
            tr.write(saved, flush=True)
            tr.currentfspath = saved


    @staticmethod
    def _line(tr: Any, text: str) -> None:
        tr.write_line(text)
        tr.flush()


@contextlib.contextmanager
def _live_log_lock(config: pytest.Config) -> Iterator[None]:
    """Hold the live-log handler's lock (``--log-cli-level``), which pytest's handler holds while
    it writes a record to the terminal: the two never write at once."""
    plugin = config.pluginmanager.get_plugin("logging-plugin")
    handler = getattr(plugin, "log_cli_handler", None)
    if not isinstance(handler, logging.Handler):
        yield
        return
    handler.acquire()
    try:
        yield
    finally:
        handler.release()
