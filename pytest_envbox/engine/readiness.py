"""Readiness: run a service's probe until it passes, the service dies, or the deadline passes.

Each probe kind is one small check function; the waiting is done once, by
:func:`pytest_envbox.wait.wait_until`, which wakes at once when the service exits so that a crash
during start-up fails the test immediately, not at the timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_envbox.errors import NotReady
from pytest_envbox.spec import ExecProbe, HttpProbe, LogProbe, Probe, TcpProbe
from pytest_envbox.wait import FIRST_INTERVAL, Deadline, wait_until

if TYPE_CHECKING:
    from pytest_envbox.engine.handle import ServiceHandle

TAIL_LINES = 30


class LogFollower:
    """Reads a growing log file line by line, from an offset, without rereading what it has seen."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset
        self._partial = ""

    def new_lines(self) -> list[str]:
        """Complete lines written since the last call, plus the current unfinished line."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        if data:
            self.offset += len(data)
            text = self._partial + data.decode(errors="replace")
            *lines, self._partial = text.split("\n")
        else:
            lines = []
        # The unfinished line is offered too (a prompt may never get its newline); it is offered
        # again, completed, once its newline arrives, which is harmless for a search.
        return [*lines, self._partial] if self._partial else lines

    def search(self, regex: re.Pattern[str]) -> re.Match[str] | None:
        for line in self.new_lines():
            m = regex.search(line)
            if m is not None:
                return m
        return None


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.rstrip("\n").split("\n")[-lines:])


def _check_for(handle: ServiceHandle, probe: Probe, deadline: Deadline) -> Callable[[], bool]:
    if isinstance(probe, TcpProbe):
        return lambda: handle._tcp_check(probe.port)
    if isinstance(probe, HttpProbe):
        import requests

        url = f"http://127.0.0.1:{handle.port(probe.port)}{probe.path}"
        session = requests.Session()

        def http_ok() -> bool:
            left = deadline.remaining()
            try:
                r = session.get(url, timeout=min(2.0, left or 2.0), allow_redirects=False,
                                headers={"Connection": "close"})  # fmt: skip
            except requests.RequestException:
                return False
            if probe.status is None:
                return 200 <= r.status_code < 300
            return bool(r.status_code == probe.status)

        return http_ok
    if isinstance(probe, LogProbe):
        follower = LogFollower(handle.log_path, handle._log_start)
        return lambda: follower.search(probe.regex) is not None
    if isinstance(probe, ExecProbe):
        def exec_ok() -> bool:
            left = deadline.remaining()
            try:
                r = handle.exec(list(probe.argv), timeout=max(0.01, left if left is not None else 30.0))
            except subprocess.TimeoutExpired:
                return False  # a hung check is "not ready yet"; the deadline decides
            return r.returncode == 0

        return exec_ok
    raise TypeError(f"unknown probe {probe!r}")


def wait_ready(handle: ServiceHandle, probe: Probe | None) -> None:
    """Return when ``probe`` passes; raise ``ServiceFailed`` or ``NotReady`` otherwise.

    Without a probe a service is ready once it has been exec'd.
    """
    if probe is None:
        handle._raise_if_exited()
        return
    deadline = Deadline(probe.timeout)
    check = _check_for(handle, probe, deadline)

    def step() -> bool | None:
        handle._raise_if_exited()
        return True if check() else None

    # A tcp check is one cheap request to the supervisor, and a fast server listens within a
    # millisecond of its exec: look again sooner than the other probes do.
    first = 0.0002 if isinstance(probe, TcpProbe) else FIRST_INTERVAL
    if wait_until(step, deadline, wake=handle._exited, interval=probe.interval, first=first) is None:
        handle._raise_if_exited()
        raise NotReady(handle.name, probe.describe(), probe.timeout, log_tail(handle.log_path))
