"""``env.network.reachable()``'s socket swap (engine/reach.py), against a server of this test on
127.0.0.1 standing in for a service: a socket connecting into the subnet becomes the lent one,
with its timeout and options; others are left alone; the patch goes when the last block ends."""

from __future__ import annotations

import socket
from typing import Any

from pytest_envbox.engine import reach


class FakeLender:
    """Lends plain sockets of this namespace, and counts them."""

    def __init__(self) -> None:
        self.lent: list[int] = []

    def take(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        self.lent.append(s.fileno())
        return s


def test_a_socket_connecting_into_the_subnet_becomes_the_lent_one_with_its_own_options() -> None:
    lender: Any = FakeLender()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with reach.reachable("127.0.0.0/8", lender):
            assert "connect" in socket.socket.__dict__
            client = socket.socket()
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            client.settimeout(3.5)
            fd = client.fileno()
            client.connect(("127.0.0.1", port))
            assert len(lender.lent) == 1 and client.fileno() == fd  # same descriptor, new socket
            assert client.gettimeout() == 3.5
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            conn, _ = server.accept()
            conn.sendall(b"hi")
            assert client.recv(2) == b"hi"
            conn.close()
            client.close()
            # A name, an address outside, a UDP socket, a bound socket: left alone.
            other = socket.socket()
            other.settimeout(3)
            assert other.connect_ex(("localhost", port)) == 0
            other.close()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.connect(("127.0.0.1", 9))
            bound = socket.socket()
            bound.bind(("127.0.0.1", 0))
            bound.connect(("127.0.0.1", port))
            bound.close()
            assert len(lender.lent) == 1
        assert "connect" not in socket.socket.__dict__ and "connect_ex" not in socket.socket.__dict__


def test_blocks_nest_and_the_patch_stays_until_the_last_ends() -> None:
    a: Any = FakeLender()
    b: Any = FakeLender()
    with reach.reachable("198.18.0.0/24", a):
        with reach.reachable("198.18.1.0/24", b):
            assert "connect" in socket.socket.__dict__
        assert "connect" in socket.socket.__dict__
    assert "connect" not in socket.socket.__dict__
