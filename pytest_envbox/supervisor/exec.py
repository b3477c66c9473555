"""``handle.exec()``: a command run inside a running service, by a helper that joins its
namespaces and cgroup; its stdin, stdout and stderr are pipes the loop serves."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pytest_envbox.kernel import cgroups
from pytest_envbox.kernel import linux as L
from pytest_envbox.sandbox import status
from pytest_envbox.sandbox.init import close_fds_except, exec_command
from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.supervisor.protocol import ExecReply, ExecRequest, Handlers
from pytest_envbox.supervisor.spares import fork_running
from pytest_envbox.supervisor.sync import Pending, close_sync, receive

if TYPE_CHECKING:
    from pytest_envbox.supervisor.server import Supervisor

__all__ = ["Exec", "Execs"]

_NS_FOR_EXEC = (("ipc", L.CLONE_NEWIPC), ("uts", L.CLONE_NEWUTS), ("net", L.CLONE_NEWNET),
                ("cgroup", L.CLONE_NEWCGROUP), ("pid", L.CLONE_NEWPID),
                ("mnt", L.CLONE_NEWNS))  # fmt: skip


@dataclass
class Exec:
    req_id: int
    pid: int
    deadline: float | None
    stdin: bytes
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    fds: dict[int, str] = field(default_factory=dict)  # open pipe fd -> "out" | "err" | "in"
    status: int | None = None
    timed_out: bool = False
    error: str | None = None
    command_pid: int | None = None  # host pid of the command itself (the helper's child)
    #: its sync socket reached EOF: any setup error it carried is known (see _maybe_finish)
    synced: bool = False


class Execs:
    """The commands running in services, by their helper's pid."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.execs: dict[int, Exec] = {}  # helper pid -> exec

    def handlers(self) -> Handlers:
        return {ExecRequest: self.exec}

    def exec(self, req_id: int, req: ExecRequest) -> None:
        slot, p, timeout = req.slot, req.plan, req.timeout
        s = self.sup.services.slots[slot]
        if s.init_pid is None:
            raise ValueError("the service is not running")
        cg = self.sup.cgroups.services.get(slot)
        if cg is not None and cg.frozen:
            raise ValueError("the service is paused: its cgroup would freeze the command too; "
                             "resume() it first")  # fmt: skip
        ns_fds = [(os.open(f"/proc/{s.init_pid}/ns/{n}", os.O_RDONLY | os.O_CLOEXEC), t)
                  for n, t in _NS_FOR_EXEC]  # fmt: skip
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]  # stdin, stdout, stderr
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the command's host pid
        # Into the service's cgroup as its backend says: on cgroup v2 the command is cloned
        # straight in (no move, no grace-period wait). By the helper, which is single-threaded:
        # a raw clone3 here, beside the supervisor's other threads, could copy a lock one of
        # them holds (glibc's malloc locks, say) and hang the child.
        place = cg.placement() if cg is not None else cgroups.NOWHERE
        try:
            pid = fork_running(_exec_helper, p, req.argv, ns_fds, place,
                               (pipes[0][0], pipes[1][1], pipes[2][1]), child,
                               close=parent, code=126)  # fmt: skip
        finally:
            place.close()
            for fd, _ in ns_fds:
                os.close(fd)
            os.close(pipes[0][0])
            os.close(pipes[1][1])
            os.close(pipes[2][1])
            child.close()
        ex = Exec(req_id, pid, time.monotonic() + timeout if timeout is not None else None,
                  (req.input or "").encode())  # fmt: skip
        self.execs[pid] = ex
        sel = self.sup.sel
        for fd, kind, ev in ((pipes[0][1], "in", selectors.EVENT_WRITE),
                             (pipes[1][0], "out", selectors.EVENT_READ),
                             (pipes[2][0], "err", selectors.EVENT_READ)):  # fmt: skip
            os.set_blocking(fd, False)
            ex.fds[fd] = kind
            sel.register(fd, ev, (ex, fd))
        pend = Pending("exec", req_id, slot, parent, pid)
        self.sup.pending[parent.fileno()] = pend
        sel.register(parent, selectors.EVENT_READ, pend)
        return None

    def on_pipe(self, ex: Exec, fd: int) -> None:
        kind = ex.fds[fd]
        try:
            if kind == "in":
                n = os.write(fd, ex.stdin[:65536])
                ex.stdin = ex.stdin[n:]
                if not ex.stdin:
                    self._close_fd(ex, fd)
                return
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_fd(ex, fd)
            return
        (ex.out if kind == "out" else ex.err).extend(data)

    def on_sync(self, pend: Pending) -> None:
        if receive(pend):
            return
        # EOF: the helper has run the command and closed its end, or failed.
        close_sync(self.sup.sel, self.sup.pending, pend)
        ex = self.execs.get(pend.pid)
        if ex is not None:
            ex.error = None if pend.error is None else pend.error.text
            ex.command_pid = pend.main_pid
            ex.synced = True
            self._maybe_finish(ex)

    def on_exit(self, pid: int, code: int) -> None:
        ex = self.execs.get(pid)
        if ex is not None:
            ex.status = code
            self._maybe_finish(ex)

    def _close_fd(self, ex: Exec, fd: int) -> None:
        self.sup.sel.unregister(fd)
        os.close(fd)
        del ex.fds[fd]
        self._maybe_finish(ex)

    def _maybe_finish(self, ex: Exec) -> None:
        readers_open = any(k != "in" for k in ex.fds.values())
        # The command's exit, its output and its sync socket's EOF come in any order: a command
        # that could not be run says why on the socket, which must be read before the reply.
        if ex.status is None or not ex.synced or (readers_open and not ex.timed_out):
            return
        for fd in list(ex.fds):
            self.sup.sel.unregister(fd)
            os.close(fd)
        ex.fds.clear()
        del self.execs[ex.pid]
        self.sup.reply(ex.req_id, ExecReply(ex.status, ex.out.decode(errors="replace"),
                                            ex.err.decode(errors="replace"), ex.timed_out,
                                            ex.error))  # fmt: skip

    def next_deadline(self) -> float | None:
        deadlines = [e.deadline for e in self.execs.values() if e.deadline and not e.timed_out]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def check_deadlines(self) -> None:
        now = time.monotonic()
        for ex in list(self.execs.values()):
            if ex.deadline is not None and not ex.timed_out and now >= ex.deadline:
                ex.timed_out = True
                for pid in (ex.command_pid, ex.pid):  # the command, then its helper
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)

    def kill_all(self) -> None:
        for ex in list(self.execs.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(ex.pid, signal.SIGKILL)


def _exec_helper(plan: SandboxPlan, argv: list[str], ns_fds: list[tuple[int, int]],
                 place: cgroups.Placement, stdio: tuple[int, int, int],
                 sync: socket.socket) -> None:  # fmt: skip
    """Join a running sandbox's namespaces and run ``argv`` there as the service would.

    Not dumpable: while it still holds the supervisor's privileges, nothing inside the sandbox may
    ptrace it. It forks once more because joining a PID namespace only applies to children;
    with ``place.cgroup_fd`` (cgroup v2) that child starts in the service's cgroup (clone3),
    otherwise the helper enters the cgroup first and the child inherits it.
    """
    code = 126
    try:
        L.set_pdeathsig(signal.SIGKILL)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        L.set_dumpable(False)
        keep = [] if place.cgroup_fd is None else [place.cgroup_fd]
        close_fds_except([fd for fd, _ in ns_fds] + [*stdio, sync.fileno(), *keep])
        place.enter()  # into the service's cgroup: its limits count the command too
        for fd, nstype in ns_fds:
            L.setns(fd, nstype)
        pid = os.fork() if place.cgroup_fd is None else L.fork_with(0, cgroup_fd=place.cgroup_fd)
        if pid == 0:
            L.set_pdeathsig(signal.SIGKILL)
            exec_command(plan, argv, sync, stdio)
        sync.close()
        for fd in stdio:
            os.close(fd)
        _, wait_status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(wait_status)
        code = 128 - code if code < 0 else code
    except BaseException as e:
        with contextlib.suppress(OSError):
            sync.send(status.error(f"exec setup failed: {e}"))
    os._exit(code)
