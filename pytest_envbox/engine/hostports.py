"""Fixed host ports at an environment's open: reserved all at once, or a clear error.

Before any service of an environment starts, every host port its services fix (or take from a
range) is bound by the supervisor and held for the service's relay (``supervisor/hostports.py``).
A port that cannot be had fails the environment there, with nothing started: the error names who
holds it, read from ``/proc`` (:mod:`~pytest_envbox.kernel.portholders`) by this process, which
sees the host's uids as they are (a rootless supervisor sees them through its user namespace).

It is a :class:`~pytest_envbox.errors.ServiceFailed` (the service "could not be started at all"),
not a ``ConfigError``: the declaration is valid, and the same one works once the port is free.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable

from pytest_envbox.engine.client import SupervisorClient, rootless
from pytest_envbox.errors import ServiceFailed
from pytest_envbox.kernel.portholders import Holder, holders
from pytest_envbox.ports import host_text
from pytest_envbox.spec import Service
from pytest_envbox.supervisor.protocol import ReserveRequest

__all__ = ["reserve_host_ports", "taken_reason"]

#: A supervisor's command line holds this (engine/client.py starts it so).
_SUPERVISOR_MARK = "pytest_envbox.supervisor.server"


def reserve_host_ports(sup: SupervisorClient, env_id: str, specs: Iterable[Service]) -> None:
    """Have the supervisor hold every host port that ``specs`` fix, before any of them starts;
    :class:`ServiceFailed`, naming the holder, when one is taken (then none is held)."""
    wanted = [(f"{env_id}/{s.name}", p, *s.host_ports[p]) for s in specs for p in s.ports
              if p in s.host_ports]  # fmt: skip
    if not wanted:
        return
    refused = sup.call(ReserveRequest(wanted)).refused
    if refused is None:
        return
    slot, port, low, high, err = refused
    service = slot.split("/", 1)[1]
    raise ServiceFailed(service, None, "", reason=taken_reason(port, (low, high), err, sup.pid))


def _unprivileged_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def _who(h: Holder, supervisor: int) -> str:
    if h.pid is None:
        if h.uid != os.getuid():
            return f"a process of another user (uid {h.uid}, {h.user})"
        return f"a socket of user {h.user} that no process here shows (another PID namespace?)"
    if _SUPERVISOR_MARK in h.cmdline:
        if h.pid == supervisor:
            return (f"this test process's own envbox supervisor (pid {h.pid}): another "
                    "environment open at the same time publishes it")  # fmt: skip
        parent = ""
        if h.ppid:
            with contextlib.suppress(OSError), open(f"/proc/{h.ppid}/cmdline", "rb") as f:
                parent = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
        return (f"the envbox supervisor (pid {h.pid}) of another test run or xdist worker "
                f"(pid {h.ppid}: {parent or '?'})")  # fmt: skip
    cmdline = " ".join(h.cmdline.split())
    cmdline = cmdline if len(cmdline) <= 100 else cmdline[:97] + "..."
    return f"pid {h.pid} ({h.comm}, user {h.user}): {cmdline}"


def taken_reason(port: int, host: tuple[int, int], err: int, supervisor: int) -> str:
    """Why ``port`` could not be published on ``host`` (a port or range), and what to do."""
    where = host_text(host)
    low, high = host
    span = f"{low}-{min(high + 20, 65535)}"
    if err == errno.EACCES:
        start = _unprivileged_start()
        who = "rootless mode has no such privilege on the host" if rootless() else "this user lacks it"
        example = max(start, 8000 + low % 1000)
        return (f"could not be started: its port {port} cannot be published on 127.0.0.1:{where}: "
                f"host ports below {start} need root (CAP_NET_BIND_SERVICE), and {who}; give a "
                f"host port from {start} up, e.g. {{ port = {port}, host = {example} }}, or run "
                "the tests as root")  # fmt: skip
    if err != errno.EADDRINUSE:
        return (f"could not be started: its port {port} cannot be published on 127.0.0.1:{where}: "
                f"{os.strerror(err)}")  # fmt: skip
    found: list[str] = []
    envbox = False
    for p in range(low, min(high, low + 2) + 1):
        for h in holders(p)[:1]:
            envbox = envbox or _SUPERVISOR_MARK in h.cmdline
            found.append(f"{p} by {_who(h, supervisor)}" if low != high else _who(h, supervisor))
    held = "; ".join(found) or "a socket that has just gone, or one of another network namespace"
    if high - low > 2 and found:
        held += "; ..."
    what = f"host port {low} is" if low == high else f"every port of host range {where} is"
    if envbox:
        advice = (f"fixed host ports collide between environments open at once, test runs and "
                  f"xdist workers: give a range (host = \"{span}\") or no host port, and read the "
                  f"port with handle.port({port})")  # fmt: skip
    else:
        advice = (f"stop that process, or give another host port, a range (host = \"{span}\") or "
                  f"none (a free port, read with handle.port({port}))")  # fmt: skip
    return (f"could not be started: its port {port} cannot be published: {what} taken on "
            f"127.0.0.1, held by {held}. To fix: {advice}")  # fmt: skip
