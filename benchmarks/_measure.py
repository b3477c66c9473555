"""Small measuring tools shared by the benchmarks: timing stats, readiness from /proc, pidfds.

Readiness of a server that runs in a network namespace of its own (unshare, bwrap, podman) cannot
be probed by connecting from the host: every baseline is called ready when ``127.0.0.1:PORT``
accepts a connection *inside its namespace* (see :func:`wait_accepting`), as envbox's own ``tcp``
probe does.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import socket
import statistics
import struct
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

_PR_SET_CHILD_SUBREAPER = 36
_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914

#: One start-to-ready and stop of a variant: (ready, stop) in seconds.
Cycle = Callable[[], tuple[float, float]]


def summary(samples: list[float], scale: float = 1e3) -> dict[str, Any]:
    """Median, min, max (in ms by default) and the count of ``samples`` (seconds)."""
    if not samples:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(samples) * scale, "min": min(samples) * scale,
            "max": max(samples) * scale, "n": len(samples)}  # fmt: skip


def set_subreaper() -> bool:
    """Orphans (the command of a killed ``unshare``) come back to this process to be reaped."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, breadth first (from ``/proc/*/task/*/children``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out.extend(kids)
        todo.extend(kids)
    return out


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _netns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _in_own_netns(root: int, timeout: float) -> int:
    """``root`` or the first of its descendants that is in a network namespace other than ours
    (an unshare or bwrap that has not made its namespace yet is not)."""
    ours = _netns(os.getpid())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in [root, *descendants(root)]:
            ns = _netns(pid)
            if ns is not None and ns != ours:
                return pid
        time.sleep(0.00005)
    raise TimeoutError(f"no process under {root} entered a network namespace within {timeout}s")


def wait_accepting(root: int, port: int, timeout: float = 10.0, *, own_netns: bool = True) -> None:
    """Poll (every ~50 us) until ``127.0.0.1:port`` accepts a TCP connection in the network
    namespace of ``root`` (or of its first descendant in a namespace of its own).

    A connection attempt is what envbox's own tcp probe makes. (Reading ``/proc/<pid>/net/tcp``
    would be simpler, but the kernel walks its whole connection hash for that: milliseconds on a
    machine with much memory.) A socket's namespace is the creating thread's, so a thread joins
    the namespace and polls from there.
    """
    deadline = time.monotonic() + timeout
    fd = None
    if own_netns:
        fd = os.open(f"/proc/{_in_own_netns(root, timeout)}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    error: list[BaseException] = []

    def poll() -> None:
        try:
            if fd is not None:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            lo_up = fd is None
            while time.monotonic() < deadline:
                if not os.path.exists(f"/proc/{root}") or _zombie(root):
                    raise RuntimeError(f"pid {root} exited before port {port} accepted a connection")
                with socket.socket() as s:
                    err = s.connect_ex(("127.0.0.1", port))
                    if err == 0:
                        return
                    if err == errno.ENETUNREACH and not lo_up:
                        # unshare --net leaves lo down (envbox and bwrap bring it up): up it goes.
                        ifr = struct.pack("16sh", b"lo", 0)
                        flags = struct.unpack("16sh", fcntl.ioctl(s, _SIOCGIFFLAGS, ifr))[1]
                        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | 1))
                        lo_up = True
                        continue
                time.sleep(0.00005)
            raise TimeoutError(f"nothing accepted on port {port} under pid {root} within {timeout}s")
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=poll)
    t.start()
    t.join()
    if fd is not None:
        os.close(fd)
    if error:
        raise error[0]


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Wait until every pid has exited, on pidfds (no polling); a zombie counts as exited."""
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
    try:
        deadline = time.monotonic() + timeout
        for fd in fds:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"processes {pids} still alive after {timeout}s")
    finally:
        for fd in fds:
            os.close(fd)


def reap_all() -> None:
    """Reap every exited child (orphans included: this process is a subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB: shared pages divided among their sharers, the
    honest cost of one more process that shares most of its memory with others."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(variants: dict[str, Cycle], n: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Interleaved: every iteration runs each variant once, the order rotating. A run that
    fails is run again (and counted); a baseline that fails three times in a row is dropped
    (bwrap 0.8 does, when many namespaces come and go), envbox never is."""
    out: dict[str, dict[str, list[float]]] = {k: defaultdict(list) for k in variants}
    names = list(variants)
    for i in range(warmup + n):
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            if "dropped" in out[name]:
                continue
            for attempt in range(3):  # a tool that fails now and then: counted, and run again
                try:
                    ready, stop = variants[name]()
                    break
                except Exception as e:
                    out[name]["failures"].append(1.0)
                    again = "again" if attempt < 2 else "giving up"
                    _log(f"{name}: run failed ({type(e).__name__}: {e}), {again}")
                    reap_all()
            else:
                if name.startswith("envbox"):
                    raise RuntimeError(f"{name} failed three times in a row")
                out[name]["dropped"].append(1.0)
                continue
            if i >= warmup:
                out[name]["ready"].append(ready)
                out[name]["stop"].append(stop)
                out[name]["total"].append(ready + stop)
    return out
