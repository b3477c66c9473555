"""Service addresses from the test process without a route: rootless mode's way in.

In root mode the host routes each environment's subnet to it (supervisor/subnets.py) and a
client connects to ``handle.ip`` as to any address. Rootless, the supervisor may not touch the
host's network, but it may make sockets inside an environment's network: a socket belongs to the
namespace it was made in for its whole life, wherever it goes. So the supervisor makes TCP
sockets there and sends them to this process over a Unix socket (``SCM_RIGHTS``); inside
``with env.network.reachable():``, a Python socket that connects to an address of the
environment's subnet first becomes one of them (``dup2`` onto its own descriptor, its timeout
and common options applied again), then connects as it was asked to. redis-py's Sentinel or
Cluster client, or anything else written over Python's ``socket`` module, works unchanged.

Limits: TCP over IPv4 only; only Python sockets (``socket.socket.connect`` and ``connect_ex``,
so asyncio too, but not clients that connect in C: libpq, librdkafka, gRPC's core); a socket
bound before it connects keeps its binding and is left alone; a service sees the connection
come from its environment's end of the network (``.1``), as through a published port.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from pytest_envbox.engine.client import SupervisorClient
from pytest_envbox.supervisor.protocol import LendRequest

__all__ = ["Lender", "reachable"]

#: Sockets asked for at a time (one request, one message of descriptors).
BATCH = 8

#: Options a client commonly sets before it connects (redis-py sets the first four), carried over
#: to the socket that takes its place. Buffer sizes are not: setting them stops autotuning.
_OPTIONS = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE), (socket.IPPROTO_TCP, socket.TCP_NODELAY),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT), (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    (socket.SOL_SOCKET, socket.SO_REUSEADDR), (socket.SOL_SOCKET, socket.SO_OOBINLINE),
)  # fmt: skip


class Lender:
    """Unconnected TCP sockets of one environment's network, from its supervisor, a few at a time."""

    def __init__(self, sup: SupervisorClient, env_id: str) -> None:
        self._sup = sup
        self._env_id = env_id
        self._stock: list[socket.socket] = []
        self._lock = threading.Lock()

    def take(self) -> socket.socket:
        with self._lock:
            if not self._stock:
                sup = self._sup
                with sup.fds_lock:  # one request, then its message: never another's
                    sup.call(LendRequest(self._env_id, BATCH))
                    _msg, fds, _flags, _addr = socket.recv_fds(sup.fds, 16, 64, socket.MSG_CMSG_CLOEXEC)
                # The kernel installs what this process's descriptor limit allows and drops the
                # rest (MSG_CTRUNC): with none, this connect fails as socket() itself would.
                if not fds:
                    raise OSError(errno.EMFILE, "reachable(): no descriptor left for a socket "
                                  "of the environment's network (" + os.strerror(errno.EMFILE) + ")")
                self._stock = [socket.socket(fileno=fd) for fd in fds]
            return self._stock.pop()

    def close(self) -> None:
        with self._lock:
            for s in self._stock:
                s.close()
            self._stock.clear()


_lock = threading.Lock()
_active: dict[int, tuple[ipaddress.IPv4Network, Lender]] = {}
_saved: dict[str, Any] = {}  # what socket.socket's own dict had under each name patched


@contextlib.contextmanager
def reachable(subnet: str, lender: Lender) -> Iterator[None]:
    """Within it, Python sockets connecting to an address of ``subnet`` get there (see above).
    Nests, and holds for every thread while any is active."""
    key = object()
    with _lock:
        if not _active:
            _patch()
        _active[id(key)] = (ipaddress.IPv4Network(subnet), lender)
    try:
        yield
    finally:
        with _lock:
            del _active[id(key)]
            if not _active:
                _unpatch()


def _patch() -> None:
    for name in ("connect", "connect_ex"):
        _saved[name] = socket.socket.__dict__.get(name)
        setattr(socket.socket, name, _wrap(getattr(socket.socket, name)))


def _unpatch() -> None:
    for name, before in _saved.items():
        if before is None:
            delattr(socket.socket, name)
        else:
            setattr(socket.socket, name, before)
    _saved.clear()


def _wrap(original: Callable[[socket.socket, Any], Any]) -> Callable[[socket.socket, Any], Any]:
    def connect(self: socket.socket, address: Any) -> Any:
        lender = _lender_for(self, address)
        if lender is not None:
            _become(self, lender.take())
        return original(self, address)

    connect.__doc__ = original.__doc__
    return connect


def _lender_for(sock: socket.socket, address: Any) -> Lender | None:
    if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
        return None
    if not isinstance(address, tuple) or len(address) != 2 or not isinstance(address[0], str):
        return None
    try:
        ip = ipaddress.IPv4Address(address[0])
    except ValueError:
        return None  # a name: not looked up here
    for net, lender in list(_active.values()):
        if ip in net:
            with contextlib.suppress(OSError):
                if sock.getsockname()[1] != 0:
                    return None  # bound on purpose: left as it is
            return lender
    return None


def _become(sock: socket.socket, new: socket.socket) -> None:
    """Put ``new`` under ``sock``'s descriptor, with ``sock``'s timeout and options."""
    options = []
    for level, opt in _OPTIONS:
        with contextlib.suppress(OSError):
            options.append((level, opt, sock.getsockopt(level, opt)))
    linger = sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
    timeout = sock.gettimeout()
    with new:
        os.dup2(new.fileno(), sock.fileno(), inheritable=sock.get_inheritable())
    for level, opt, value in options:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, opt, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    sock.settimeout(timeout)  # also the descriptor's O_NONBLOCK, which dup2 took from ``new``
