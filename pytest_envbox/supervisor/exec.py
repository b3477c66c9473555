"""``handle.exec()``: a command run inside a running service, by a helper that joins its
namespaces and cgroup; its stdin, stdout and stderr are pipes the loop serves.

Its output goes to the client as it comes, in :class:`~.protocol.ExecOutput` parts of
``EXEC_CHUNK`` bytes (the rest with the reply), so that no frame grows with it and the
supervisor holds at most a part of each stream; past ``EXEC_STREAM_CAP`` bytes of one stream the
command is killed and the reply says so. Input past the request's first part arrives as
:class:`~.protocol.ExecInput` parts, written as the pipe takes them.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pytest_envbox.kernel import cgroups
from pytest_envbox.kernel import linux as L
from pytest_envbox.sandbox import status
from pytest_envbox.sandbox.init import close_fds_except, exec_command
from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.supervisor.protocol import (
    EXEC_CHUNK,
    EXEC_STREAM_CAP,
    ExecInput,
    ExecOutput,
    ExecReply,
    ExecRequest,
    Handlers,
)
from pytest_envbox.supervisor.spares import fork_running
from pytest_envbox.supervisor.sync import Pending, close_sync, receive

if TYPE_CHECKING:
    from pytest_envbox.supervisor.server import Supervisor

__all__ = ["Exec", "Execs"]

_NS_FOR_EXEC = (("ipc", L.CLONE_NEWIPC), ("uts", L.CLONE_NEWUTS), ("net", L.CLONE_NEWNET),
                ("cgroup", L.CLONE_NEWCGROUP), ("pid", L.CLONE_NEWPID),
                ("mnt", L.CLONE_NEWNS))  # fmt: skip
Stream = Literal["stdout", "stderr"]


def _buffers() -> dict[Stream, bytearray]:
    return {"stdout": bytearray(), "stderr": bytearray()}


@dataclass
class Exec:
    req_id: int
    pid: int
    deadline: float | None
    stdin: bytearray  # input not yet written
    stdin_end: bool  # no more input comes: close the pipe once ``stdin`` is written
    stdin_fd: int | None  # None once closed (all written, or the command would read no more)
    stdin_watched: bool = False  # registered with the selector: only while there is input
    #: output not yet sent (less than EXEC_CHUNK), and how much each stream has made
    out: dict[Stream, bytearray] = field(default_factory=_buffers)
    made: dict[Stream, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    fds: dict[int, Stream] = field(default_factory=dict)  # open output pipe fd -> its stream
    status: int | None = None
    timed_out: bool = False
    overflow: Stream | None = None  # the stream that passed EXEC_STREAM_CAP
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
        return {ExecRequest: self.exec, ExecInput: self.input}

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
                  bytearray(req.input), not req.more_input, pipes[0][1])  # fmt: skip
        self.execs[pid] = ex
        sel = self.sup.sel
        outputs: tuple[tuple[int, Stream], ...] = ((pipes[1][0], "stdout"), (pipes[2][0], "stderr"))
        for fd, stream in outputs:
            os.set_blocking(fd, False)
            ex.fds[fd] = stream
            sel.register(fd, selectors.EVENT_READ, (ex, fd))
        os.set_blocking(pipes[0][1], False)
        self._feed(ex)
        pend = Pending("exec", req_id, slot, parent, pid)
        self.sup.pending[parent.fileno()] = pend
        sel.register(parent, selectors.EVENT_READ, pend)
        return None

    def input(self, req_id: int, part: ExecInput) -> None:
        """More of an exec's stdin; dropped if the exec is over or its command closed stdin."""
        ex = next((e for e in self.execs.values() if e.req_id == req_id), None)
        if ex is None or ex.stdin_fd is None:
            return None
        ex.stdin += part.data
        ex.stdin_end = part.end
        self._feed(ex)
        return None

    def _feed(self, ex: Exec) -> None:
        """Watch stdin while there is input to write (a pipe is nearly always writable: watched
        without input, the loop would spin); close it once the last input is written."""
        fd = ex.stdin_fd
        if fd is None:
            return
        if ex.stdin and not ex.stdin_watched:
            self.sup.sel.register(fd, selectors.EVENT_WRITE, (ex, fd))
            ex.stdin_watched = True
        elif not ex.stdin:
            if ex.stdin_watched:
                self.sup.sel.unregister(fd)
                ex.stdin_watched = False
            if ex.stdin_end:
                self._close_stdin(ex)

    def _close_stdin(self, ex: Exec) -> None:
        if ex.stdin_fd is not None:
            if ex.stdin_watched:
                self.sup.sel.unregister(ex.stdin_fd)
            os.close(ex.stdin_fd)
        ex.stdin_fd, ex.stdin_watched = None, False
        ex.stdin.clear()

    def on_pipe(self, ex: Exec, fd: int) -> None:
        if fd == ex.stdin_fd:
            try:
                n = os.write(fd, ex.stdin[:65536])
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the command reads no more; the rest is dropped
                self._close_stdin(ex)
                return
            del ex.stdin[:n]
            self._feed(ex)
            return
        stream = ex.fds.get(fd)
        if stream is None:  # closed earlier in this turn of the loop (an overflow, the end)
            return
        buf = ex.out[stream]
        try:
            data = os.read(fd, min(65536, EXEC_CHUNK - len(buf)))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_fd(ex, fd)
            return
        ex.made[stream] += len(data)
        if ex.made[stream] > EXEC_STREAM_CAP:
            self._overflow(ex, stream)
            return
        buf += data
        if len(buf) >= EXEC_CHUNK:
            self.sup.send(ExecOutput(stream, bytes(buf)), ex.req_id)
            buf.clear()

    def _overflow(self, ex: Exec, stream: Stream) -> None:
        """Past the cap: kill the command, read and keep no more; the reply says why."""
        ex.overflow = stream
        for buf in ex.out.values():
            buf.clear()
        _kill(ex)
        for fd in ex.fds:
            self.sup.sel.unregister(fd)
            os.close(fd)
        ex.fds.clear()
        self._maybe_finish(ex)

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
        # The command's exit, its output and its sync socket's EOF come in any order: a command
        # that could not be run says why on the socket, which must be read before the reply.
        # The output of a command we killed may be held open by what it started: not waited for.
        killed = ex.timed_out or ex.overflow is not None
        if ex.status is None or not ex.synced or (ex.fds and not killed):
            return
        for fd in list(ex.fds):
            self.sup.sel.unregister(fd)
            os.close(fd)
        ex.fds.clear()
        self._close_stdin(ex)
        del self.execs[ex.pid]
        out, err = bytes(ex.out["stdout"]), bytes(ex.out["stderr"])
        self.sup.reply(ex.req_id, ExecReply(ex.status, out, err, ex.timed_out, ex.error, ex.overflow))

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
                _kill(ex)

    def kill_all(self) -> None:
        for ex in list(self.execs.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(ex.pid, signal.SIGKILL)


def _kill(ex: Exec) -> None:
    for pid in (ex.command_pid, ex.pid):  # the command, then its helper
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


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
