"""Publishing a port of a sandboxed service on the host's 127.0.0.1.

A relay listens on ``127.0.0.1:<ephemeral>`` in the host's network namespace and, for each client,
opens its upstream socket *inside the service's network namespace* and connects to the service's
loopback. So the service need not listen on 0.0.0.0, and no host interface, route or firewall rule
is touched. Bytes move with ``splice(2)`` through a pipe, never through Python buffers: the kernel
copies page references, which keeps bulk throughput close to direct loopback.

Threads, not an event loop: each direction of each connection is one thread blocked in splice,
which is the lowest-latency shape in Python (no selector round trip per chunk). A socket's network
namespace is fixed when the socket is created, so the accept thread joins the service's namespace
once, and every upstream socket it creates lands there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import threading

from pytest_envbox.kernel import linux as L

__all__ = ["Relay"]

_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031


class Relay:
    """One published port: ``127.0.0.1:host_port`` -> ``port`` on the service's loopback."""

    def __init__(self, netns_fd: int, port: int, via: tuple[int, str] | None = None,
                 listener: socket.socket | None = None) -> None:
        """``listener``: a socket already listening on 127.0.0.1 (a fixed host port, reserved
        at the environment's open), the relay's from now on; None: listen on a free port."""
        self.port = port
        self._netns_fd = os.dup(netns_fd)
        # On an environment's network: connect from its hub to the service's address, so that the
        # faults on its link apply to the test's traffic too (loopback only when nothing listens
        # on that address: a service bound to 127.0.0.1).
        self._via = (os.dup(via[0]), via[1]) if via is not None else None
        self._loopback = False  # learned: the service listens on its loopback only
        if listener is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
        self._listener = listener
        self.host_port: int = self._listener.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name=f"relay-{port}", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        try:
            L.setns(self._via[0] if self._via else self._netns_fd, L.CLONE_NEWNET)  # this thread only
        finally:
            if self._via is not None:
                os.close(self._via[0])
            else:
                os.close(self._netns_fd)
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    client.close()
                    return
                self._conns.add(client)
            # Threads made here start in the service's namespace too (they copy this thread's).
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        """Connect upstream (a slow service holds up this client only), then pump both ways."""
        try:
            upstream = self._connect_upstream()
        except OSError:
            self._forget(client, reset=True)
            return
        with self._lock:
            if self._closed:
                upstream.close()
                return
            self._conns.add(upstream)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        pair = _Pair(self, client, upstream)
        threading.Thread(target=pair.pump, args=(upstream, client), daemon=True).start()
        pair.pump(client, upstream)

    def _connect_upstream(self) -> socket.socket:
        if self._via is not None and not self._loopback:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with self._lock:  # close() cuts a connect that hangs (its link is down, say)
                if self._closed:
                    s.close()
                    raise OSError("the relay is closed")
                self._conns.add(s)
            try:
                s.connect((self._via[1], self.port))
                return s
            except ConnectionRefusedError:
                # Nothing on its network address: it listens on its loopback only. Go there
                # from now on (the link's faults then do not apply to this port).
                self._forget(s)
                self._loopback = True
            except OSError:
                self._forget(s)
                raise  # a fault on its link: the test sees it
        if self._via is not None:
            with self._lock:  # the fd is closed by close(), under the lock
                if self._closed:
                    raise OSError("the relay is closed")
                L.setns(self._netns_fd, L.CLONE_NEWNET)  # this connection's thread only
        last: OSError | None = None
        for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.connect((addr, self.port))
                return s
            except OSError as e:
                s.close()
                last = e
        assert last is not None
        raise last

    def _forget(self, *socks: socket.socket, reset: bool = False) -> None:
        with self._lock:
            for s in socks:
                self._conns.discard(s)
                if reset:
                    _reset(s)
                else:
                    s.close()

    def close(self) -> None:
        """Stop accepting and cut every open connection."""
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        if self._via is not None:
            with self._lock, contextlib.suppress(OSError):
                os.close(self._netns_fd)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class _Pair:
    """The two directions of one relayed connection; the last one out closes both sockets."""

    def __init__(self, relay: Relay, a: socket.socket, b: socket.socket) -> None:
        self._relay = relay
        self._socks = (a, b)
        self._left = 2
        self._lock = threading.Lock()

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, _F_SETPIPE_SZ, _CHUNK)
            sfd, dfd = src.fileno(), dst.fileno()
            while True:
                n = os.splice(sfd, w, _CHUNK)
                if n == 0:
                    break
                while n:
                    # No SPLICE_F_MORE here: it holds back small writes (Nagle-like stalls).
                    n -= os.splice(r, dfd, n)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            for s in self._socks:  # an error on one side (a reset, say) ends the connection
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        finally:
            os.close(r)
            os.close(w)
            with self._lock:
                self._left -= 1
                last = self._left == 0
            if last:
                self._relay._forget(*self._socks)


def _reset(s: socket.socket) -> None:
    """Close with RST, so the client sees the refusal the service gave us, not a clean EOF."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
