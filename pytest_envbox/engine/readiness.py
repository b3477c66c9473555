"""Readiness: run a service's probe until it passes, the service dies, or the deadline passes.

Each probe kind is one small check function; the waiting is done by
:func:`pytest_envbox.wait.wait_until`, which wakes at once when the service exits so that a crash
during start-up fails the test immediately, not at the timeout. :func:`wait_for_log` (behind
``ServiceHandle.wait_for_log``) searches the log the same way the log probe does.

This module sees a service only through :class:`ReadinessTarget`, the few things a probe needs;
``ServiceHandle`` hands it an adapter, so nothing here depends on the handle's insides.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from pytest_envbox.engine.waiting import BOARD
from pytest_envbox.errors import EnvboxError, NotReady, ServiceFailed
from pytest_envbox.spec import ExecProbe, HttpProbe, LogProbe, Probe, Service, TcpProbe
from pytest_envbox.wait import FIRST_INTERVAL, Deadline, wait_until

__all__ = [
    "TAIL_LINES",
    "LogFollower",
    "ReadinessTarget",
    "log_tail",
    "wait_for_log",
    "wait_ready",
    "wait_service",
]

#: Each wait for a service's readiness, and how it ended (INFO).
_log = logging.getLogger(__name__)

TAIL_LINES = 30
#: How long an exec probe that could not start waits to hear that the service has exited.
_EXIT_NEWS = 2.0


class ReadinessTarget(Protocol):
    """What probing a service needs of it: the current run, seen from outside.

    Implemented by an adapter in :mod:`pytest_envbox.engine.handle` over a ``ServiceHandle``;
    a test can implement it with a small fake.
    """

    @property
    def name(self) -> str:
        """The service's name, for error messages."""

    @property
    def log_path(self) -> Path:
        """The service's log file (stdout and stderr of every run, appended)."""

    @property
    def log_start(self) -> int:
        """Where this run's output starts in the log file (a byte offset)."""

    @property
    def exited(self) -> threading.Event:
        """Set when this run has ended: waits sleep on it, so that an exit wakes them at once."""

    @property
    def returncode(self) -> int | None:
        """The run's exit code (or 128 + signal number) once it has ended; None before."""

    def raise_if_exited(self) -> None:
        """Raise ``ServiceFailed`` (return code, log tail, reason) if this run has ended."""

    def tcp_check(self, port: int) -> bool:
        """Whether ``port`` accepts a connection inside the service's network namespace."""

    def port(self, p: int) -> int:
        """The host port on 127.0.0.1 where port ``p`` of the service is published."""

    def exec(self, argv: Sequence[str], *, timeout: float | None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the service, as ``ServiceHandle.exec`` does."""


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


def _check_for(target: ReadinessTarget, probe: Probe, deadline: Deadline) -> Callable[[], bool]:
    if isinstance(probe, TcpProbe):
        return lambda: target.tcp_check(probe.port)
    if isinstance(probe, HttpProbe):
        import requests

        url = f"http://127.0.0.1:{target.port(probe.port)}{probe.path}"
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
        follower = LogFollower(target.log_path, target.log_start)
        return lambda: follower.search(probe.regex) is not None
    if isinstance(probe, ExecProbe):
        def exec_ok() -> bool:
            left = deadline.remaining()
            try:
                r = target.exec(list(probe.argv), timeout=max(0.01, left if left is not None else 30.0))
            except subprocess.TimeoutExpired:
                return False  # a hung check is "not ready yet"; the deadline decides
            except EnvboxError:
                # The service exited while the check was being started in its namespaces: the
                # exit (its code, its log) is the news, not "cannot exec". The supervisor may
                # tell of the exit a moment after the exec failed: wait for that, bounded.
                if target.exited.wait(_EXIT_NEWS):
                    target.raise_if_exited()
                raise
            return r.returncode == 0

        return exec_ok
    raise TypeError(f"unknown probe {probe!r}")


def wait_ready(target: ReadinessTarget, probe: Probe | None) -> None:
    """Return when ``probe`` passes; raise ``ServiceFailed`` or ``NotReady`` otherwise.

    Without a probe a service is ready once it has been exec'd.
    """
    if probe is None:
        target.raise_if_exited()
        return
    deadline = Deadline(probe.timeout)
    check = _check_for(target, probe, deadline)

    def step() -> bool | None:
        target.raise_if_exited()
        return True if check() else None

    # A tcp check is one cheap request to the supervisor, and a fast server listens within a
    # millisecond of its exec: look again sooner than the other probes do.
    first = 0.0002 if isinstance(probe, TcpProbe) else FIRST_INTERVAL
    if wait_until(step, deadline, wake=target.exited, interval=probe.interval, first=first) is None:
        target.raise_if_exited()
        raise NotReady(target.name, probe.describe(), probe.timeout, log_tail(target.log_path))


#: How long a ``oneshot`` service (an init container, a Job, a migration) may take to complete.
ONESHOT_TIMEOUT = 600.0


def wait_completed(target: ReadinessTarget, retries: int = 0, restart: Callable[[], None] | None = None,
                   timeout: float = ONESHOT_TIMEOUT) -> None:  # fmt: skip
    """Return when a ``oneshot`` service has exited with code 0; for another code, ``restart``
    it, up to ``retries`` times, after 0.5 s, 1 s, 2 s... (at most 10 s: Kubernetes backs off from
    10 s, which a test would wait out for nothing), then ``ServiceFailed`` (its code and log).
    ``NotReady`` if a run is still going after ``timeout`` seconds."""
    for attempt in range(retries + 1):
        if attempt:
            assert restart is not None
            time.sleep(min(0.5 * 2 ** (attempt - 1), 10.0))  # a back-off, not a wait for a condition
            restart()
        if not target.exited.wait(timeout):
            raise NotReady(target.name, "completion (a oneshot service: exit code 0)", timeout,
                           log_tail(target.log_path))  # fmt: skip
        if target.returncode == 0:
            return
    raise ServiceFailed(target.name, target.returncode, log_tail(target.log_path),
                        reason=f"exited with return code {target.returncode}; a oneshot service "
                        "must complete with 0" + (f" (started {retries + 1} times)" if retries else ""))


def wait_service(target: ReadinessTarget, spec: Service, restart: Callable[[], None]) -> None:
    """Wait until the service of ``spec`` is ready (:func:`wait_ready`), or a ``oneshot`` one has
    completed (:func:`wait_completed`, ``restart`` running it again), on the process's
    :data:`~pytest_envbox.engine.waiting.BOARD`, which shows a slow wait to the front end; log
    the wait and its outcome."""
    probe = spec.ready
    if spec.oneshot:
        what, timeout = "completion (a oneshot service: exit code 0)", ONESHOT_TIMEOUT
    elif probe is not None:
        what, timeout = probe.describe(spec.name), probe.timeout
    else:
        wait_ready(target, None)  # ready once exec'd: nothing to wait for
        return
    _log.info("service %r: waiting until %s (timeout %gs)", spec.name, what, timeout)
    started = time.monotonic()
    try:
        with BOARD.waiting(spec.name, what, timeout):
            if spec.oneshot:
                wait_completed(target, spec.retries, restart)
            else:
                wait_ready(target, probe)
    except EnvboxError as e:
        _log.info("service %r failed after %.2fs: %s", spec.name, time.monotonic() - started,
                  str(e).split("\n", 1)[0])  # fmt: skip
        raise
    _log.info("service %r %s after %.2fs", spec.name, "completed" if spec.oneshot else "ready",
              time.monotonic() - started)  # fmt: skip


def wait_for_log(target: ReadinessTarget, pattern: str, timeout: float) -> re.Match[str]:
    """The first line of this run's output matching ``pattern`` (``re.search``), once written.

    Lines written before the call count. ``NotReady`` (with the log tail) on timeout, or at once
    when the service has exited without writing such a line.
    """
    regex = re.compile(pattern)
    follower = LogFollower(target.log_path, target.log_start)  # this run's output
    deadline = Deadline(timeout)

    def check() -> re.Match[str] | None:
        m = follower.search(regex)
        if m is None and target.exited.is_set():
            m = follower.search(regex)  # what it wrote before exiting
            if m is None:
                raise NotReady(target.name, f"log line matching {pattern!r} (the service "
                               f"exited with {target.returncode})", timeout,
                               log_tail(target.log_path))  # fmt: skip
        return m

    m = wait_until(check, deadline, wake=None)
    if m is None:
        raise NotReady(target.name, f"log line matching {pattern!r}", timeout,
                       log_tail(target.log_path))  # fmt: skip
    return m
