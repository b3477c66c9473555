"""A start's or an exec's sync socket: the sandbox says there that the command was exec'd (with
a pidfd of the service, or the command's pid in its credentials), or why it could not be."""

from __future__ import annotations

import array
import os
import selectors
import socket
import sys
from dataclasses import dataclass

from pytest_envbox.sandbox import status

__all__ = ["Pending", "close_sync", "pidfd_pid", "receive"]


@dataclass
class Pending:
    """A start (or an exec) waiting for its sync socket to say exec happened, or why not."""

    kind: str  # "start" | "exec"
    req_id: int
    slot: str
    sock: socket.socket
    pid: int  # init (start) or helper (exec)
    main_pid: int | None = None
    pidfd: int | None = None
    got_exec: bool = False
    #: why it failed, as the sandbox said (see :mod:`pytest_envbox.sandbox.status`)
    error: status.Why | None = None
    replied: bool = False


def receive(pend: Pending) -> bytes:
    """Read one message of the sync socket into ``pend``; the message, empty at end-of-file."""
    try:
        msg, anc, _flags, _addr = pend.sock.recvmsg(  # fds (close-on-exec) and credentials
            4096, socket.CMSG_SPACE(16) + socket.CMSG_SPACE(12), socket.MSG_CMSG_CLOEXEC)
    except OSError:
        msg, anc = b"", []
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            for fd in array.array("i", data[: len(data) - len(data) % 4]):
                if pend.kind == "start" and pend.pidfd is None:
                    pend.pidfd = fd  # the service: kept, to signal it safely
                    pend.main_pid = pidfd_pid(fd)  # None if it is already gone
                else:
                    os.close(fd)
        elif level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS and pend.kind == "exec":
            # exec's command reports itself; a start's init sends a pidfd of the service.
            pid = int.from_bytes(data[:4], sys.byteorder, signed=True)
            pend.main_pid = pend.main_pid or (pid if pid > 0 else None)
    why = status.why(msg)
    if why is not None:
        pend.error = why
    elif msg == status.EXEC and pend.kind == "start":
        pend.got_exec = True
    return msg


def close_sync(sel: selectors.BaseSelector, pending: dict[int, Pending], pend: Pending) -> None:
    """The sync socket said all it had to (end-of-file): stop watching it."""
    sel.unregister(pend.sock)
    del pending[pend.sock.fileno()]
    pend.sock.close()


def pidfd_pid(fd: int) -> int | None:
    """The pid (in our PID namespace) of the process a pidfd refers to, from its fdinfo.

    None when it has been reaped already (the kernel then says -1) or cannot be told.
    """
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError):
        pass
    return None
