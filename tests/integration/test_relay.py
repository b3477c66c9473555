"""A published port behaves as the server behind it: bursts of clients, resets, half-closes.

Each behaviour is checked through the relay and, as the reference, against the same server run
bare on the host (a /usr/bin/python3 script: the services' private /tmp hides an interpreter under
/tmp, as in a CI checkout there). Traffic stays on 127.0.0.1 and inside the test's namespaces.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from benchmarks.bench_burst import ECHO, burst  # the benchmark's echo server and burst, measured alike
from pytest_envbox import Environment, Service, probe
from pytest_envbox.engine.client import get_supervisor
from pytest_envbox.kernel import linux as L
from pytest_envbox.supervisor.protocol import CensusRequest
from pytest_envbox.wait import Deadline, wait_until

PY = "/usr/bin/python3"
PORT = 8000
BURST = 2000
T = TypeVar("T")

# The first byte of a connection picks what the server does with it:
#   R: abort it at once (SO_LINGER 0, close: an RST)
#   A: send "bye", then abort it
#   W: read until end-of-file or error, and remember which ("eof" or "reset")
#   H: read until end-of-file, then answer how many bytes came, and close
#   S: send "hello", shut its sending side, then read until end-of-file (remembered as "eof N")
#   Q: answer what the last W or S connection saw ("open" while it is still open)
#   E: echo everything, until end-of-file
BEHAVE = r"""
import socket, struct, sys, threading
last = ""
def serve(c):
    global last
    mode = c.recv(1)
    if mode in (b"R", b"A"):
        if mode == b"A":
            c.sendall(b"bye")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif mode in (b"W", b"S"):
        last = "open"
        if mode == b"S":
            c.sendall(b"hello")
            c.shutdown(socket.SHUT_WR)
        n = 0
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                n += len(data)
            last = f"eof {n}"
        except ConnectionResetError:
            last = "reset"
    elif mode == b"H":
        n = 0
        while True:
            data = c.recv(65536)
            if not data:
                break
            n += len(data)
        c.sendall(str(n).encode())
    elif mode == b"Q":
        c.sendall(last.encode())
    elif mode == b"E":
        while data := c.recv(1 << 20):
            c.sendall(data)
    c.close()
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(64)
print("PORT", ls.getsockname()[1], flush=True)
while True:
    threading.Thread(target=serve, args=(ls.accept()[0],), daemon=True).start()
"""


@contextlib.contextmanager
def on_host(script: str) -> Iterator[int]:
    """``script`` run bare on the host, on an ephemeral port of 127.0.0.1: its port."""
    p = subprocess.Popen([PY, "-c", script, "127.0.0.1", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        word, port = p.stdout.readline().split()
        assert word == "PORT"
        yield int(port)
    finally:
        p.kill()
        p.wait()


@contextlib.contextmanager
def published(script: str, **kw: object) -> Iterator[int]:
    """``script`` as a service listening on every address: the host port of its published port."""
    svc = Service("srv", [PY, "-c", script, "0.0.0.0", str(PORT)], ports=[PORT],
                  ready=probe.tcp(PORT), **kw)  # type: ignore[arg-type]  # fmt: skip
    with Environment([svc]) as env:
        yield env["srv"].port(PORT)


@pytest.fixture(params=["host", "relay"])
def behave(request: pytest.FixtureRequest) -> Iterator[int]:
    """The behaving server's port: bare on the host (the reference), or through a relay."""
    with (on_host if request.param == "host" else published)(BEHAVE) as port:
        yield port


def connect(port: int, mode: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(mode)
    return s


def read_all(s: socket.socket) -> bytes:
    out = b""
    while data := s.recv(65536):
        out += data
    return out


def last_seen(port: int) -> str:
    """What the server's last W/S connection saw ("open": not ended yet)."""
    with connect(port, b"Q") as q:
        return read_all(q).decode()


def ended(port: int) -> str | None:
    seen = last_seen(port)
    return None if seen in ("", "open") else seen


# --- resets and half-closes ------------------------------------------------------------------


def test_a_server_that_aborts_a_connection_resets_the_client(behave: int) -> None:
    with connect(behave, b"R") as s, pytest.raises(ConnectionResetError):
        s.recv(1)  # not b"": an abort is not a clean end


def test_what_a_server_sent_before_it_aborted_reaches_the_client_and_then_the_reset(behave: int) -> None:
    for _ in range(20):  # the bytes and the reset may reach the relay together, or apart
        with connect(behave, b"A") as s:
            assert wait_until(lambda: _pending(s) or None, Deadline(10))  # (both have come)
            assert s.recv(3) == b"bye"
            with pytest.raises(ConnectionResetError):
                s.recv(1)


def _pending(s: socket.socket) -> bool:
    """Whether the peer's reset has reached ``s`` (its error is pending behind the bytes)."""
    import select

    p = select.poll()
    p.register(s, select.POLLERR | select.POLLHUP)
    return bool(p.poll(0))


def test_a_client_that_aborts_a_connection_resets_the_server(behave: int) -> None:
    s = connect(behave, b"W")
    s.sendall(b"some bytes")
    assert wait_until(lambda: last_seen(behave) == "open" or None, Deadline(10))  # it is reading
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    assert wait_until(lambda: ended(behave), Deadline(10)) == "reset"


def test_a_client_that_shuts_its_sending_side_still_gets_the_answer(behave: int) -> None:
    with connect(behave, b"H") as s:
        s.sendall(b"x" * 100_000)
        s.shutdown(socket.SHUT_WR)  # the server sees end-of-file, and answers after it
        assert read_all(s) == b"100000"


def test_a_server_that_shuts_its_sending_side_still_gets_what_the_client_sends(behave: int) -> None:
    with connect(behave, b"S") as s:
        assert read_all(s) == b"hello"  # its end-of-file reached us...
        s.sendall(b"y" * 50_000)  # ...and our direction still flows
        s.shutdown(socket.SHUT_WR)
        assert wait_until(lambda: ended(behave), Deadline(10)) == "eof 50000"


def test_bulk_and_small_messages_arrive_intact_both_ways(behave: int) -> None:
    """Small messages (copied) and bulk (spliced, after the first full read) on one connection."""
    data = os.urandom(1 << 16) * 64 + b"tail"  # 4 MiB and a bit: the relay's switch mid-stream
    with connect(behave, b"E") as s:
        for msg in (b"a", b"hello" * 100):
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += s.recv(65536)
            assert got == msg
        sender = threading.Thread(target=s.sendall, args=(data,))
        sender.start()
        got = bytearray()
        while len(got) < len(data):
            chunk = s.recv(1 << 20)
            assert chunk, f"end-of-file after {len(got)} of {len(data)} bytes"
            got += chunk
        sender.join()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()


def _holding(pid: int, ns: str) -> list[str]:
    """Which threads of ``pid`` are in the namespace ``ns``, and which of its fds refer to it."""
    held = [f"thread {t}" for t in os.listdir(f"/proc/{pid}/task")
            if _readlink(f"/proc/{pid}/task/{t}/ns/net") == ns]  # fmt: skip
    fds = [f"fd {fd}" for fd in os.listdir(f"/proc/{pid}/fd") if _readlink(f"/proc/{pid}/fd/{fd}") == ns]
    return held + fds


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def test_a_released_service_namespace_is_not_kept_by_the_relay() -> None:
    """The relay's thread makes a loopback-only service's upstream sockets inside the service's
    namespace: once the service is released, nothing of the supervisor is left there."""
    sup = get_supervisor()
    svc = Service("srv", [PY, "-c", BEHAVE, "127.0.0.1", str(PORT)], ports=[PORT], ready=probe.tcp(PORT))
    with Environment([svc]) as env:
        ns = os.readlink(f"/proc/{env['srv'].pid}/ns/net")
        with connect(env["srv"].port(PORT), b"H") as s:  # refused at its address: its loopback
            s.shutdown(socket.SHUT_WR)
            assert read_all(s) == b"0"
        assert any(h.startswith("thread") for h in _holding(sup.pid, ns))
    assert wait_until(lambda: not _holding(sup.pid, ns) or None, Deadline(5)), _holding(sup.pid, ns)


# Listens on 8001 first ("up"); on the service's port only once 8001 got a connection.
LATE = """
import socket
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 8001))
t.listen(1)
print("up", flush=True)
t.accept()[0].close()
""" + BEHAVE


def test_a_client_refused_before_the_service_listens_does_not_route_the_port_around_its_link() -> None:
    """A client early (before the service listens: on a fixed host port, during a restart) is
    refused at the service's address and on its loopback alike: that must not make the relay
    take the loopback from then on, where ``link.down()`` no longer applies."""
    svc = Service("srv", [PY, "-c", LATE, "0.0.0.0", str(PORT)], ports=[PORT, 8001],
                  ready=probe.log("up"))  # fmt: skip
    with Environment([svc]) as env:
        port = env["srv"].port(PORT)

        def answer(timeout: float = 10) -> bytes | OSError:
            try:
                with connect(port, b"H") as s:
                    s.settimeout(timeout)
                    s.shutdown(socket.SHUT_WR)
                    return read_all(s)
            except OSError as e:  # (the reset may come while connecting or sending)
                return e

        assert isinstance(answer(), OSError)  # nothing listens yet: refused (reset)
        socket.create_connection(("127.0.0.1", env["srv"].port(8001)), timeout=10).close()
        assert wait_until(lambda: answer() == b"0" or None, Deadline(10))
        env["srv"].link.down()
        got = answer(timeout=1)  # (a connect over a link that is down may hang: no answer is right)
        assert isinstance(got, OSError), f"served with the link down: {got!r}"


# --- bursts ----------------------------------------------------------------------------------


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("Threads:")).split()[1])


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for a burst's client sockets in this process (and the bare server, its child)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * BURST + 1000
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"this process may open {hard} files; the burst needs {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need if soft < need else soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_2000_clients_connecting_at_once_are_served_as_fast_as_the_host_serves_them(
        many_files: None) -> None:  # fmt: skip
    """Each client connects and has a byte echoed; the relay keeps up (within 2x the same server
    on the host, measured here, best of two each) on a bounded number of threads; afterwards a new
    client is served at once. (The relay used to accept from a queue of 128 on a thread per
    connection: 2000 clients took 14 s, SYNs dropped, on 4000 threads.)"""
    sup = get_supervisor()
    with on_host(ECHO) as host_port, published(ECHO, limits={"nofile": 3 * BURST}) as port:
        host, relayed = [], []
        for _ in range(2):
            dt, socks = burst(host_port, BURST)
            host.append(dt)
            for s in socks:
                s.close()
            dt, socks = burst(port, BURST)
            relayed.append(dt)
            during = threads(sup.pid)
            for s in socks:
                s.close()
            assert during < 20, f"the supervisor ran {during} threads with {BURST} connections open"
        # Within 2x, and half a second for a loaded machine: on two cores the relay's share of
        # the work (a second TCP connection per client: handshake, segments) is about what the
        # client and the server do together, so 2x is the floor there, not a margin.
        assert min(relayed) <= 2 * min(host) + 0.5, (
            f"{BURST} clients at once: {min(relayed):.3f} s through the relay, "
            f"{min(host):.3f} s to the same server on the host (all: {relayed}, {host})")
        # At once: no queue of SYNs still being retransmitted, no backlog of threads.
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.settimeout(1.0)
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"


# --- the answer of a service whose hub's bridge lost a port -----------------------------------

# Answers its one client once told to from its own loopback: reads the request, then listens on
# PORT + 1 (which says "the request is here"), and sends the answer when a byte comes there.
HELD = """
import socket, sys
port = int(sys.argv[1])
ls = socket.create_server(("0.0.0.0", port))
print("up", flush=True)
c = ls.accept()[0]
request = c.recv(64)
go = socket.create_server(("127.0.0.1", port + 1))
t = go.accept()[0]
t.recv(1)
c.sendall(b"answer to " + request)
c.close()
t.close()
"""


def _in_netns(path: str, make: Callable[[], T]) -> T:
    """``make()`` run by a thread of its own that entered the network namespace ``path`` (a
    socket's namespace is fixed when it is made); the thread ends there, this one stays home."""
    box: dict[str, T | BaseException] = {}

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                L.setns(fd, L.CLONE_NEWNET)
            finally:
                os.close(fd)
            box["result"] = make()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def _hub(env: Environment) -> str:
    """A path that opens the environment's hub namespace (the supervisor's fd of it)."""
    sup = get_supervisor()
    ns = f"net:[{sup.call(CensusRequest()).hub_netns[env.id]}]"
    fd = next(fd for fd in os.listdir(f"/proc/{sup.pid}/fd") if _readlink(f"/proc/{sup.pid}/fd/{fd}") == ns)
    return f"/proc/{sup.pid}/fd/{fd}"


@pytest.mark.needs_root("adds a veth to the hub's bridge from outside, with nsenter")
def test_an_answer_sent_after_a_port_left_the_hub_s_bridge_reaches_the_client() -> None:
    """A released service's veth leaves its hub's bridge when the kernel frees its namespace, at
    a moment of the kernel's choosing (later, under load). A bridge without an address of its own
    takes its ports' lowest, and changed it then: a service that had learnt the old one from the
    relay's connect sent its answers to an address no port had any more, lost until the hub spoke
    again (past a client's 5 s timeout: 1 connection in 1000 or so, more under load). Made
    certain here: a port with the lowest address joins the bridge and leaves it between the
    request and the answer."""
    svc = Service("srv", [PY, "-c", HELD, str(PORT)], ports=[PORT], ready=probe.log("up"))
    with Environment([svc]) as env:
        hub, netns = _hub(env), f"/proc/{env['srv'].pid}/ns/net"

        def ip(*args: str) -> None:
            subprocess.run(["nsenter", f"--net={hub}", "ip", "link", *args], check=True)

        ip("add", "vlow", "address", "00:00:00:00:00:01", "type", "veth", "peer", "name", "vlowpeer")
        try:
            ip("set", "vlow", "master", "br0")
            with socket.create_connection(("127.0.0.1", env["srv"].port(PORT)), timeout=10) as s:
                s.sendall(b"ping")  # the relay connects from the hub: the service learns its MAC

                def told() -> socket.socket | None:  # the request is there once PORT + 1 listens
                    t = _in_netns(netns, socket.socket)
                    try:
                        t.connect(("127.0.0.1", PORT + 1))
                        return t
                    except ConnectionRefusedError:
                        t.close()
                        return None

                trigger = wait_until(told, Deadline(10))
                assert trigger is not None, "the request never reached the service"
                with trigger:
                    ip("del", "vlow")  # the port leaves the bridge, as a released service's does
                    trigger.sendall(b"!")
                    # A few seconds: the answer takes a millisecond; a lost one comes back only
                    # when the service's neighbour entry is probed again (5 s and more).
                    s.settimeout(4)
                    try:
                        got = s.recv(64)
                    except TimeoutError:
                        got = b"(no answer within 4 s)"
                assert got == b"answer to ping"
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["nsenter", f"--net={hub}", "ip", "link", "del", "vlow"],
                               check=True, stderr=subprocess.DEVNULL)  # fmt: skip
