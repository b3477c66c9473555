"""Pull progress in pytest's terminal, drawn without breaking its output.

On a terminal the status is one line rewritten in place (``TerminalReporter.rewrite``, as
pytest-xdist draws its own status), started on a fresh line and ended with a newline, so the
test file's dots resume below it. Elsewhere (a CI log) a line every few seconds. xdist workers
draw nothing: their output goes nowhere the user sees.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import pytest

from pytest_envbox.images.progress import Show

__all__ = ["terminal_show"]


def terminal_show(config: pytest.Config) -> Show | None:
    """A ``show(text, final)`` drawing on pytest's terminal (looked up when drawing: it may
    register after this plugin), or None on an xdist worker."""
    if hasattr(config, "workerinput"):
        return None
    state: dict[str, Any] = {"drawing": False, "last": 0.0}

    def show(text: str, final: bool) -> None:
        tr: Any = config.pluginmanager.get_plugin("terminalreporter")
        if tr is None:  # -p no:terminal
            return
        # Output is captured while fixtures run (the pull happens in one): let it through, as
        # pytest's live logging does.
        capman: Any = config.pluginmanager.get_plugin("capturemanager")
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            _draw(tr, state, text, final)

    return show


def _draw(tr: Any, state: dict[str, Any], text: str, final: bool) -> None:
    """One status update: rewritten in place on a terminal, a line every few seconds elsewhere.

    The status starts on a line of its own; once it is over, the test file's name is written
    again (as pytest does after a warning) so that its results continue on a whole line.
    """
    if not state["drawing"]:
        state["drawing"], state["path"] = True, tr.currentfspath
        tr.ensure_newline()
    if bool(getattr(tr, "isatty", False)):
        tr.rewrite(text, erase=True)
        if final:
            tr.write("\n")
    else:
        now = time.monotonic()
        if final or now - float(state["last"]) >= 3.0:
            state["last"] = now
            tr.write_line(text)
    if final:
        state["drawing"] = False
        path = state.pop("path", None)
        if path is not None:
            tr.write(os.path.relpath(path, tr.startpath) + " ")
            tr.currentfspath = path
