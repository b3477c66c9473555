"""Pull progress in pytest's terminal, drawn without breaking its output.

On a terminal the status is one line rewritten in place (``TerminalReporter.rewrite``, as
pytest-xdist draws its own status), started on a fresh line and ended with a newline, so the
test file's dots resume below it. Elsewhere (a CI log) a line every few seconds. xdist workers
draw nothing: their output goes nowhere the user sees.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from pytest_envbox.images.progress import Show

__all__ = ["terminal_show"]


def terminal_show(config: pytest.Config) -> Show | None:
    """A ``show(text, final)`` drawing on pytest's terminal, or None when there is none."""
    tr: Any = config.pluginmanager.get_plugin("terminalreporter")
    if tr is None or hasattr(config, "workerinput"):
        return None
    tty = bool(getattr(tr, "isatty", False))
    state = {"drawing": False, "last": 0.0}

    def show(text: str, final: bool) -> None:
        if tty:
            if not state["drawing"]:
                tr.ensure_newline()
                state["drawing"] = True
            tr.rewrite(text, erase=True)
            if final:
                tr.write("\n")
                state["drawing"] = False
            return
        now = time.monotonic()
        if final or now - float(state["last"]) >= 3.0:
            state["last"] = now
            tr.write_line(text)

    return show
