"""Fixed host ports, held from the moment an environment opens until its services publish them.

A service may fix the host port of a published port (``{ port = 6379, host = 6379 }``) or give
a range to take the first free port of. Whether such a port is free is only known by binding it,
and a port found free can be taken by someone else a moment later; so the environment asks for
all of its fixed ports at once, before any of its services starts (``reserve``), and the
listening sockets are held here until each service's relay takes its own (:meth:`HostPorts.take`). A taken
port then fails the environment with nothing started and nothing to undo: all or nothing.

The sockets listen at once: a client that connects before the service's relay is up waits in
the backlog, and the port shows as held (LISTEN) in ``/proc/net/tcp``, where a second test run
asking for it finds who holds it. They go with the environment's network
(:meth:`HostPorts.drop`), or with the supervisor.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from typing import TYPE_CHECKING

from pytest_envbox.supervisor.network import env_of
from pytest_envbox.supervisor.protocol import Handlers, ReserveReply, ReserveRequest

if TYPE_CHECKING:
    from pytest_envbox.supervisor.server import Supervisor

__all__ = ["HostPorts", "bind_first_free"]


def bind_first_free(low: int, high: int) -> socket.socket:
    """A socket listening on the first port of ``low..high`` that binds on 127.0.0.1; the last
    error (EADDRINUSE: all are taken, EACCES: below the unprivileged ports) when none does."""
    last: OSError | None = None
    for port in range(low, high + 1):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # As every relay does: a port whose last connections linger in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(socket.SOMAXCONN)  # EADDRINUSE here too: another SO_REUSEADDR socket listens
            return s
        except OSError as e:
            s.close()
            last = e
            if e.errno not in (errno.EADDRINUSE, errno.EACCES):
                break
    assert last is not None
    raise last


class HostPorts:
    """The host ports reserved for slots not yet started: slot -> port -> listening socket."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.held: dict[str, dict[int, socket.socket]] = {}

    def handlers(self) -> Handlers:
        return {ReserveRequest: self.reserve}

    def reserve(self, req_id: int, req: ReserveRequest) -> ReserveReply:
        """Bind every port asked for, or none. Fixed ports first, then ranges narrowest first:
        a range then steps over the ports that another service of the environment fixes."""
        made: list[tuple[str, int]] = []
        for slot, port, low, high in sorted(req.ports, key=lambda e: e[3] - e[2]):
            s = self.sup.services.slots.get(slot)
            if port in self.held.get(slot, {}) or (s is not None and port in s.relays):
                continue  # held or published already (a service started again)
            try:
                sock = bind_first_free(low, high)
            except OSError as e:
                for done_slot, done_port in made:
                    self.held[done_slot].pop(done_port).close()
                    if not self.held[done_slot]:
                        del self.held[done_slot]
                return ReserveReply((slot, port, low, high, e.errno or 0))
            self.held.setdefault(slot, {})[port] = sock
            made.append((slot, port))
        return ReserveReply(None)

    def take(self, slot: str, port: int) -> socket.socket | None:
        """The socket reserved for the slot's port (the relay's from now on), if any."""
        ports = self.held.get(slot)
        if not ports or port not in ports:
            return None
        sock = ports.pop(port)
        if not ports:
            del self.held[slot]
        return sock

    def drop(self, env: str | None = None) -> None:
        """Close what the environment (every one, for None) still holds."""
        for slot in [s for s in self.held if env is None or env_of(s) == env]:
            for sock in self.held.pop(slot).values():
                with contextlib.suppress(OSError):
                    sock.close()
