"""Who holds a TCP port on 127.0.0.1: read from ``/proc``, as ``ss -ltnp`` would find it.

``/proc/net/tcp`` and ``tcp6`` list this network namespace's sockets with their local address,
state, owner's uid and inode; the process is the one with ``socket:[inode]`` among its
``/proc/PID/fd`` links. Another user's fds are unreadable without privilege: such a holder is
named by its uid alone. By hand rather than through ``ss`` or psutil: the error path of a fixed
host port needs only this, and neither is a dependency of the project.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import sys
from dataclasses import dataclass

__all__ = ["Holder", "holders"]

_LISTEN = "0A"
_TIME_WAIT = "06"
#: Addresses whose socket keeps 127.0.0.1:PORT from binding: itself, and the wildcards (an IPv6
#: one accepts IPv4 too, unless it is IPV6_ONLY: listed all the same, as a likely holder).
_BLOCKING = {"127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1", "::ffff:0.0.0.0"}


@dataclass(frozen=True)
class Holder:
    """A socket bound to the port: its owner's uid and, when this process may see it, its pid,
    program name (``comm``), command line and parent pid."""

    uid: int
    listening: bool
    pid: int | None = None
    comm: str = ""
    cmdline: str = ""
    ppid: int | None = None

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)


def _address(hex_addr: str) -> str:
    """An address as ``/proc/net/tcp*`` prints it: 32-bit words in the host's byte order."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i : i + 4][:: -1 if sys.byteorder == "little" else 1]
                     for i in range(0, len(raw), 4))  # fmt: skip
    return socket.inet_ntop(socket.AF_INET if len(words) == 4 else socket.AF_INET6, words)


def _sockets(port: int) -> list[tuple[int, int, bool]]:
    """(inode, uid, listening) of each socket bound where 127.0.0.1:port would be."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            addr, _, hex_port = fields[1].partition(":")
            state = fields[3]
            if int(hex_port, 16) != port or state == _TIME_WAIT or _address(addr) not in _BLOCKING:
                continue
            found.append((int(fields[9]), int(fields[7]), state == _LISTEN))
    return found


def _owners(inodes: set[int]) -> dict[int, int]:
    """inode -> pid, for the sockets among this host's fds that this process may read."""
    links = {f"socket:[{i}]": i for i in inodes if i}
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except OSError:  # another user's, or gone
            continue
        with fds:
            for fd in fds:
                with contextlib.suppress(OSError):
                    inode = links.get(os.readlink(fd.path))
                    if inode is not None:
                        out.setdefault(inode, int(entry.name))
        if len(out) == len(links):
            break
    return out


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def holders(port: int) -> list[Holder]:
    """The sockets that keep ``127.0.0.1:port`` from binding, listening ones first."""
    sockets = _sockets(port)
    owners = _owners({inode for inode, _, _ in sockets})
    out = []
    for inode, uid, listening in sockets:
        pid = owners.get(inode)
        if pid is None:
            out.append(Holder(uid, listening))
            continue
        status = _read(f"/proc/{pid}/status")
        ppid = next((int(line.split()[1]) for line in status.splitlines()
                     if line.startswith("PPid:")), None)  # fmt: skip
        out.append(Holder(uid, listening, pid, _read(f"/proc/{pid}/comm").strip(),
                          _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip(), ppid))  # fmt: skip
    unique = list(dict.fromkeys(out))  # one process holds a v4 and a v6 socket: say it once
    return sorted(unique, key=lambda h: not h.listening)
