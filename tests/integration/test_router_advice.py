"""A service forges an IPv6 router advertisement on the environment's bridge (Docker's
CVE-2020-13401): its neighbours must not take it as their default router.

Service ``victim`` listens for router advertisements with a raw ICMPv6 socket and logs each one;
``rogue`` (root inside, with Docker's CAP_NET_RAW) sends one to all nodes, ff02::1, on ``eth0``.
The victim's log says when the advertisement reached it: the kernel hands a copy to raw sockets
and processes it in the same receive path, so from then on a default route would be there. The
test waits a further 0.2 s (a fixed wait: the route must not appear, there is no event for a
thing that does not happen) to cover the reader waking on another CPU before that path ends.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator

import pytest

from pytest_envbox import Environment, Service, probe
from pytest_envbox.wait import Deadline, wait_until

PY = sys.executable

LISTEN = r"""
import socket, struct
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_ICMPV6, 1, struct.pack("8I", *[0xFFFFFFFF] * 4, 0xFFFFFFBF, *[0xFFFFFFFF] * 3))
print("listening", flush=True)  # ICMP6_FILTER above: pass type 134 (router advertisement) only
while True:
    data, addr = s.recvfrom(1500)
    if data[:1] == b"\x86":
        print("router advertisement from", addr[0], flush=True)
"""

FORGE = r"""
import socket, struct
ifindex = socket.if_nametoindex("eth0")
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)  # RFC 4861: hop limit 255
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
# type 134, code 0, checksum (the kernel's), hop limit 64, flags 0, router lifetime 1800 s,
# reachable 0, retransmit 0; then a prefix option: 2001:db8:1::/64, on-link and autonomous.
ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
ra += struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0,
                  socket.inet_pton(socket.AF_INET6, "2001:db8:1::"))
s.sendto(ra, ("ff02::1", 0, 0, ifindex))
print("sent")
"""

SYSCTLS = ("ipv6/conf/all/accept_ra", "ipv6/conf/default/accept_ra", "ipv6/conf/eth0/accept_ra",
           "ipv6/conf/eth0/autoconf", "ipv6/conf/all/accept_redirects",
           "ipv6/conf/eth0/accept_redirects", "ipv4/conf/all/accept_redirects",
           "ipv4/conf/eth0/accept_redirects")  # fmt: skip


@pytest.fixture(scope="module")
def env() -> Iterator[Environment]:
    services = [Service("victim", [PY, "-c", textwrap.dedent(LISTEN)], user="0",
                        ready=probe.log("^listening$")),
                Service("rogue", ["sleep", "1000"], user="0")]  # fmt: skip
    with Environment(services) as e:
        yield e


def _default_routes(env: Environment) -> list[str]:
    """The victim's IPv6 default routes (/proc/net/ipv6_route: destination ::/0)."""
    table = env["victim"].exec(["cat", "/proc/net/ipv6_route"]).stdout
    return [ln for ln in table.splitlines() if ln.startswith("0" * 32 + " 00 ") and "eth0" in ln]


def test_a_service_refuses_router_advertisements_and_redirects(env: Environment) -> None:
    for service in ("victim", "rogue"):
        r = env[service].exec(["sh", "-c", "cd /proc/sys/net && cat " + " ".join(SYSCTLS)])
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["0"] * len(SYSCTLS), (service, r.stdout)


def _link_local_ready(env: Environment, service: str) -> bool | None:
    """eth0's fe80:: address is past duplicate address detection (not IFA_F_TENTATIVE, 0x40):
    only then can it be a packet's source."""
    for ln in env[service].exec(["cat", "/proc/net/if_inet6"]).stdout.splitlines():
        addr, _index, _prefix, _scope, flags, dev = ln.split()
        if dev == "eth0" and addr.startswith("fe80") and not int(flags, 16) & 0x40:
            return True
    return None


def test_a_forged_router_advertisement_gives_no_neighbour_a_default_route(env: Environment) -> None:
    assert _default_routes(env) == []
    assert wait_until(lambda: _link_local_ready(env, "rogue"), Deadline(10)), "no link-local address"
    r = env["rogue"].exec([PY, "-c", textwrap.dedent(FORGE)], timeout=30)
    assert r.returncode == 0 and r.stdout == "sent\n", r.stderr
    env["victim"].wait_for_log("^router advertisement from fe80:", timeout=10)  # it arrived
    # It must not be taken: no default route, no address from its prefix (see the docstring).
    assert wait_until(lambda: _default_routes(env) or None, Deadline(0.2)) is None
    addrs = env["victim"].exec(["cat", "/proc/net/if_inet6"]).stdout
    assert "20010db80001" not in addrs, addrs
