"""Sandboxes prepared ahead of their start: the zygote that forks them, and the spares it made.

A spare is a sandbox's init that has already made its namespaces and filesystem and waits for
its plan (see :func:`sandbox.init.run_spare`); a start takes one, so that it pays for none of
that. They are prepared while the loop is idle (see ``server.Supervisor.serve``).
"""

from __future__ import annotations

import array
import contextlib
import gc
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_envbox.kernel import cgroups, seccomp
from pytest_envbox.kernel import linux as L
from pytest_envbox.sandbox import status
from pytest_envbox.sandbox.init import close_fds_except, run_spare
from pytest_envbox.supervisor.protocol import Done, Handlers, PrepareRequest, Unsupported

if TYPE_CHECKING:
    from pytest_envbox.supervisor.server import Supervisor

__all__ = ["Spare", "SpareFailed", "SpareUnsupported", "Spares", "await_ready", "fork_running"]


@dataclass
class Spare:
    """A sandbox's init being prepared ahead of a start, and the cgroup it moves itself into."""

    ctl: socket.socket
    cgroup: cgroups.ServiceCgroup | None


class SpareFailed(Exception):
    """A prepared sandbox died before it could be used; the message says why."""


class SpareUnsupported(Unsupported, SpareFailed):
    """A sandbox could not be prepared because the host lacks something: no retry."""


class Spares:
    """The zygote and the spares it prepared, and how many to keep ready."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.spares: list[Spare] = []  # prepared inits (spawn)
        self.want = True  # False after a spare died unused: then prepare on demand only
        # How many spares to keep ready between starts: the widest level asked for lately (a
        # test suite starts the same environments again and again), at least one, at most 8.
        self.target = 1
        self.zygote: socket.socket | None = None

    def handlers(self) -> Handlers:
        return {PrepareRequest: self.prepare}

    def start_zygote(self) -> None:
        """Fork the process that forks spares, while this one is still small and single-threaded.

        Forking the supervisor itself takes its loop thread about a millisecond, which a request
        would wait for; asking the zygote takes a few microseconds. The zygote's children
        (the spares) are made children of the supervisor (``CLONE_PARENT``), so their exits are
        reaped here as if it had forked them.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        seccomp.program()  # assembled once, here: every sandbox forked from now on has it
        gc.freeze()  # objects the collector never walks: fewer pages copied after fork
        fork_running(_zygote, theirs, close=ours, code=0)
        theirs.close()
        self.zygote = ours

    def top_up(self) -> None:
        """Prepare spares up to the target (the loop calls this when no start is in flight)."""
        while self.sup.running and self.want and len(self.spares) < self.target:
            self.spawn()

    def spawn(self, direct: bool = False) -> None:
        """Have the next sandbox's init prepared (see :func:`~pytest_envbox.sandbox.init.run_spare`).

        By the zygote; by a fork of our own (slower) when it is gone or ``direct`` is asked.
        """
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the spare's pid, on ready
        cg, fds, into = self._spare_cgroup()
        try:
            if self.zygote is None or direct:
                raise OSError("no zygote")
            socket.send_fds(self.zygote, [b"spare-into" if into else b"spare"], [child.fileno(), *fds])
        except OSError:
            if not direct:
                self.zygote = None  # it died
            if into and cg is not None:  # a fork of ours moves itself in, the v1 way
                for fd in fds:
                    os.close(fd)
                fds = []  # closed: if the next line fails, the finally below closes nothing twice
                fds, into = cg.placement(clone=False).open_procs(), False
            # The child is PID 1 of a new PID namespace (cloned so: unshare and setns back would
            # not do in rootless mode, where our own PID namespace is out of reach once left).
            # A raw clone is safe only in a single-threaded process, and we have a relay thread:
            # a forked helper clones the spare as our child (CLONE_PARENT), as the zygote does.
            helper = os.fork()
            if helper == 0:  # pragma: no cover - the helper
                code = 125
                try:
                    parent.close()
                    if L.fork_with(L.CLONE_PARENT | L.CLONE_NEWPID, python_fixups=False) == 0:
                        run_spare(child, fds)
                    code = 0
                finally:
                    os._exit(code)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(helper, 0)
        finally:
            for fd in fds:
                os.close(fd)
        child.close()
        self.spares.append(Spare(parent, cg))

    def _spare_cgroup(self) -> tuple[cgroups.ServiceCgroup | None, list[int], bool]:
        """A new cgroup for the next spare, and how it gets in as its backend says, off the
        start's path: the zygote clones it straight in (the cgroup's directory fd, ``True``: no
        move at all, cgroup v2), or the spare writes itself into the ``cgroup.procs`` files
        opened here. None without cgroups (CgroupsUnavailable) or when the kernel refused."""
        cg = None
        try:
            cg = self.sup.cgroups.new()
            place = cg.placement()
            if place.cgroup_fd is not None:
                return cg, [place.cgroup_fd], True
            return cg, place.open_procs(), False
        except (OSError, cgroups.CgroupError):
            if cg is not None:
                self.sup.cgroups.discard(cg)
            return None, [], False  # then the start moves it (see ServiceCgroups.give)

    def take(self, direct: bool) -> Spare:
        """The oldest spare, or a new one (``direct``: by a fork of ours, not the zygote's)."""
        if not self.spares:
            self.spawn(direct=direct)
        spare = self.spares.pop(0)
        self.want = True
        return spare

    def discard(self, spare: Spare) -> None:
        spare.ctl.close()  # the spare, if alive, exits on this end-of-file
        if spare.cgroup is not None:
            self.sup.cgroups.discard(spare.cgroup)

    def prepare(self, req_id: int, req: PrepareRequest) -> Done:
        """Have ``count`` sandboxes prepared at once, in parallel: a level of services follows.
        As many are kept ready from now on, for the next environment like this one."""
        count = req.count
        self.target = max(1, min(count, 8))
        while len(self.spares) < min(count, 64):
            self.spawn()
        return Done()

    def drop(self) -> None:
        """Every spare, and the zygote, end (each on the end-of-file of its socket)."""
        for spare in self.spares:
            self.discard(spare)
        self.spares.clear()
        if self.zygote is not None:
            self.zygote.close()  # and so does the zygote
            self.zygote = None


def await_ready(ctl: socket.socket) -> tuple[int, int]:
    """Wait for a spare to be ready; return the fd of its network namespace, and its pid.

    A spare that could not prepare itself says why (:func:`~pytest_envbox.sandbox.status.why`)
    and exits.
    """
    ctl.settimeout(30.0)
    try:
        msg, anc, _flags, _addr = ctl.recvmsg(4096, socket.CMSG_SPACE(4) + socket.CMSG_SPACE(12),
                                              socket.MSG_CMSG_CLOEXEC)
    except TimeoutError:
        raise SpareFailed("the sandbox was not prepared within 30 s") from None
    finally:
        ctl.settimeout(None)
    fds: list[int] = []
    pid = None
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds += array.array("i", data[: len(data) - len(data) % 4])
        elif level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
            pid = int.from_bytes(data[:4], sys.byteorder)
    if msg == status.READY and len(fds) == 1 and pid is not None:
        return fds[0], pid
    for fd in fds:
        os.close(fd)
    why = status.why(msg)
    if why is not None and why.unsupported:
        raise SpareUnsupported(why.text)
    raise SpareFailed(why.text if why is not None else msg.decode(errors="replace") or "the sandbox died")


def _zygote(sock: socket.socket) -> None:
    """Fork spares on request; returns at EOF.

    ``clone(CLONE_PARENT | CLONE_NEWPID)``: each spare is PID 1 of a new PID namespace and a
    child of the supervisor (our parent), which reaps it like any child of its own.
    """
    L.set_pdeathsig(signal.SIGKILL)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    close_fds_except([sock.fileno()])
    gc.disable()
    while True:
        # Its socket, its cgroup's files; close-on-exec, as every fd of ours.
        msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 8, socket.MSG_CMSG_CLOEXEC)
        if not msg or not fds:
            return
        into = msg == b"spare-into"  # fds[1]: the cgroup (v2) to clone the spare straight into
        try:
            # No Python at-fork hooks: this process has no threads and no locks to reset.
            pid = L.fork_with(L.CLONE_PARENT | L.CLONE_NEWPID, python_fixups=False,
                              cgroup_fd=fds[1] if into else None)  # fmt: skip
        except OSError as e:
            # Say why; the supervisor then forks a spare itself (see Services.start's second try).
            with contextlib.suppress(OSError):
                os.write(fds[0], status.error(f"clone: {e.strerror}"))
            pid = -1
        if pid == 0:
            try:
                sock.close()
                if into:
                    os.close(fds[1])
                run_spare(socket.socket(fileno=fds[0]), () if into else fds[1:], in_cgroup=into)
            finally:
                os._exit(125)
        for fd in fds:
            os.close(fd)


def fork_running(target: Callable[..., object], *args: Any, close: socket.socket,
                 code: int = 125) -> int:  # fmt: skip
    """Fork; the child closes ``close`` (the parent's end), runs ``target(*args)``, and exits.

    ``os.fork``, never a raw clone: the supervisor has threads (relays, its record's writer,
    the next hub's maker), and only fork runs the handlers that make a child of a threaded
    process safe (glibc's malloc locks, Python's own).
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            close.close()
            target(*args)
        finally:
            os._exit(code)
    return pid
