"""Publishing a port of a sandboxed service on the host's 127.0.0.1.

A relay listens on ``127.0.0.1:<ephemeral>`` in the host's network namespace (or on a socket it
is handed, bound already) and, for each client, opens an upstream socket in the environment's hub
and connects to the service's address; or, for a service without a network, or one that refused
there (it listens on its loopback only: learned once served there, from then on), in the
service's own namespace to ``127.0.0.1``, then ``::1``. So the service need not listen on 0.0.0.0, and no host
interface, route or firewall rule is touched. An upstream that cannot be reached resets the
client, which so sees a refusal, not a clean end-of-file.

Everything runs on the supervisor's one relay loop (:mod:`.relayloop`): accepting (until the
queue is empty, from a backlog as deep as the kernel allows), connecting (non-blocking), and
moving bytes. A socket's network namespace is fixed when the socket is made, so the loop's thread
enters the hub's (or the service's) namespace before it makes an upstream socket. Out of
descriptors, a relay stops accepting for a moment: clients wait in its queue, as with a busy
server, rather than being refused.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket

from pytest_envbox.supervisor.relayloop import ERR, HUP, IN, OUT, Conn, Loop, linger0, log, shared_loop

__all__ = ["Relay", "backlog"]

# The accept errors that say "not now" (out of descriptors or memory): the listener rests until
# one of its connections ends, and the clients wait in its queue, as with a busy server.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@functools.cache
def backlog() -> int:
    """The deepest accept queue the kernel grants (``net.core.somaxconn``): a burst of clients
    waits there, not in SYN retransmits a second apart."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 4096


class _Dial:
    """A client whose upstream connect is in flight; ``stage`` indexes :meth:`Relay._target`."""

    __slots__ = ("client", "stage", "up")

    def __init__(self, client: socket.socket, up: socket.socket, stage: int) -> None:
        self.client, self.up, self.stage = client, up, stage


class Relay:
    """One published port: ``127.0.0.1:host_port`` -> ``port`` of the service.

    ``netns_fd``: the service's network namespace; ``via``: its hub's namespace and the service's
    address there, when it is on a network; ``listener``: a socket bound already (a fixed host
    port), else one is bound on ``127.0.0.1:0``. Made and closed from a thread in the
    supervisor's own network namespace (its main thread).
    """

    def __init__(self, netns_fd: int, port: int, via: tuple[int, str] | None = None,
                 listener: socket.socket | None = None) -> None:  # fmt: skip
        self.port = port
        self._loop: Loop = shared_loop()
        self._netns = _Netns(netns_fd)
        # On an environment's network: connect from its hub to the service's address, so that the
        # faults on its link apply to the test's traffic too (loopback only when nothing listens
        # on that address: a service bound to 127.0.0.1).
        self._via = (_Netns(via[0]), via[1]) if via is not None else None
        self._loopback = via is None  # learned: the service listens on its loopback only
        try:
            if listener is None:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", 0))
            listener.listen(backlog())
            listener.setblocking(False)
            self.host_port: int = listener.getsockname()[1]
        except BaseException:
            for ns in [self._netns] + ([self._via[0]] if self._via is not None else []):
                os.close(ns.fd)
            if listener is not None:
                listener.close()
            raise
        self._listener = listener
        self._conns: set[Conn] = set()
        self._dialing: set[_Dial] = set()
        self._waiting: list[tuple[socket.socket, int]] = []  # clients waiting for a descriptor
        self._closed = False
        self._resting = False
        self._loop.post(self._open)

    # --- on the loop's thread ------------------------------------------------------------------

    def _open(self) -> None:
        if not self._closed:
            self._loop.watch(self._listener.fileno(), IN, self._on_accept)

    def _on_accept(self, ev: int) -> None:
        # One client at a time, its upstream socket made before the next is accepted: out of
        # descriptors, the clients then wait in the listener's queue, as with a busy server.
        while not self._resting:
            try:
                c, _ = self._listener.accept()
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ECONNABORTED:
                    continue  # that client is gone already
                if e.errno in _EXHAUSTED:
                    self._rest(True)
                else:
                    log(f"relay of port {self.port}: accept: {e}")
                break
            c.setblocking(False)
            self._dial(c, 1 if self._loopback else 0)

    def _rest(self, resting: bool) -> None:
        """Out of descriptors: stop accepting until the loop sees some freed (a connection
        ended) or a moment passed; then connect the clients that waited for one, first."""
        if resting == self._resting or self._closed:
            return
        self._resting = resting
        self._loop.watch(self._listener.fileno(), 0 if resting else IN)
        if resting:
            self._loop.resting.append(functools.partial(self._rest, False))
            return
        waiting, self._waiting = self._waiting, []
        for c, stage in waiting:
            if self._resting:
                self._waiting.append((c, stage))
            else:
                self._dial(c, stage)

    def _target(self, stage: int) -> tuple[_Netns, socket.AddressFamily, str]:
        """Where to connect from and to: the hub to the service's address, then its own loopback."""
        if stage == 0:
            assert self._via is not None
            return self._via[0], socket.AF_INET, self._via[1]
        if stage == 1:
            return self._netns, socket.AF_INET, "127.0.0.1"
        return self._netns, socket.AF_INET6, "::1"

    def _dial(self, c: socket.socket, stage: int) -> None:
        """Start the client's upstream connect (the loop's thread enters its namespace first,
        unless it is there already)."""
        ns, family, host = self._target(stage)
        try:
            if self._closed:
                raise OSError("the relay is closed")
            self._loop.enter(ns.fd, ns.ino)
            up = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            if e.errno in _EXHAUSTED and not self._closed:  # it waits for a descriptor
                self._waiting.append((c, stage))
                self._rest(True)
            else:
                self._refuse(c)
            return
        d = _Dial(c, up, stage)
        self._dialing.add(d)
        err = up.connect_ex((host, self.port))
        if err in (0, errno.EINPROGRESS):
            self._loop.watch(up.fileno(), OUT, functools.partial(self._on_dialed, d))
        else:
            self._dialed(d, err)

    def _on_dialed(self, d: _Dial, ev: int) -> None:
        failed = ev & (ERR | HUP)
        self._dialed(d, d.up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if failed else 0)

    def _dialed(self, d: _Dial, err: int) -> None:
        self._dialing.discard(d)
        if err == 0:
            if d.stage > 0:
                # Refused on its network address, served on its loopback: it listens there only.
                # Go there from now on (the link's faults then do not apply to this port). Learned
                # only from a success: refused on both (it does not listen yet, or is restarting)
                # says nothing, and must not route the port around its link for good.
                self._loopback = True
            self._conns.add(Conn(self._loop, d.client, d.up, self._done))
            return
        self._loop.drop(d.up)
        if d.stage == 0 and err == errno.ECONNREFUSED:
            self._dial(d.client, 1)  # nothing on its network address: its loopback, then
        elif d.stage == 1:
            self._dial(d.client, 2)
        else:  # refused on its loopback too, or a fault on its link: the client sees it
            self._refuse(d.client)

    def _refuse(self, c: socket.socket) -> None:
        linger0(c)
        self._loop.drop(c)

    def _done(self, conn: Conn) -> None:
        self._conns.discard(conn)

    def _shut(self) -> bool:
        """Stop accepting, cut every connection; whether the loop's thread is in a namespace of
        ours (it must then leave it, see :meth:`.Loop.replace`)."""
        if self._closed:  # a second close() queued while a stuck loop made the first give up
            return False
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # stops listening even if a fork holds it
        self._loop.drop(self._listener)
        for d in list(self._dialing):
            with contextlib.suppress(OSError):
                d.client.shutdown(socket.SHUT_RDWR)
            self._loop.drop(d.client)
            self._loop.drop(d.up)
        self._dialing.clear()
        for c, _ in self._waiting:
            self._loop.drop(c)
        self._waiting.clear()
        for conn in list(self._conns):
            conn.cut()
        mine = [self._netns] + ([self._via[0]] if self._via is not None else [])
        for ns in mine:
            self._loop.doomed.append(ns.fd)
        return self._loop.where in {ns.ino for ns in mine}

    # --- from the supervisor's thread ------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting and cut every open connection (each peer sees end-of-file)."""
        if self._closed:
            return
        try:
            leave = self._loop.call(self._shut)
        except OSError as e:  # the loop is stuck (a bug): the rest of the release goes on
            log(f"relay of port {self.port}: {e}")
            return
        if leave:
            self._loop.replace()


class _Netns:
    """A network namespace held open by the relay (its own copy of the fd)."""

    __slots__ = ("fd", "ino")

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)
        self.ino = os.fstat(self.fd).st_ino
