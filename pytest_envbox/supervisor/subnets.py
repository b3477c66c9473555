"""Which subnet each environment gets, and the link that routes it from the host.

By default each live environment on the host gets a /24 of its own from 198.18.0.0/15 (RFC
2544's benchmarking range: 512 of them), so that the host can route every environment's subnet
to it at once. A /24 is claimed by making its link in the host's namespace: ``envbox<N>`` for
the N-th /24. The kernel makes a link name unique, atomically, across every process (xdist
workers, parallel runs): EEXIST means taken, and the next is tried. Nothing needs releasing after
a crash: the link is a veth pair whose other end is in the environment's hub, and when the hub's
namespace dies (with its supervisor, even by SIGKILL) the kernel deletes both ends.

A /24 that overlaps a route or an address of the host's (in any table) is skipped: some hosts'
VPN or proxy tools (fake-ip modes) use 198.18.0.0/16, and a route of ours would shadow theirs.
Routes shorter than /8 (default routes, a VPN's 0.0.0.0/1 and 128.0.0.0/1) claim no range and
are not counted. So is one that overlaps another environment's subnet, which its link's name says
(:func:`link_subnet`): an idle environment's link is down, without its route, and its address
(the last of its subnet) may lie outside a smaller subnet inside it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from pytest_envbox.kernel import netlink

__all__ = [
    "HUB_PORT", "LINK_PREFIX", "POOL", "POOL_SIZE", "HostLink", "claim", "claim_pool", "conflict",
    "host_end", "link_name", "link_subnet", "make_link", "pool_index", "pool_subnet", "survey",
]  # fmt: skip

POOL = ipaddress.IPv4Network("198.18.0.0/15")
POOL_SIZE = 512
LINK_PREFIX = "envbox"
#: The hub's end of the host link, a port of its bridge.
HUB_PORT = "host"


@dataclass
class HostLink:
    """The host's end of an environment's link: its name and index there, and its address."""

    name: str
    index: int
    address: str
    prefix: int


def pool_subnet(i: int) -> ipaddress.IPv4Network:
    """The ``i``-th /24 of :data:`POOL`."""
    return ipaddress.IPv4Network((int(POOL.network_address) + (i << 8), 24))


def pool_index(net: ipaddress.IPv4Network) -> int | None:
    """Which /24 of the pool ``net`` is (None if it is not one of them)."""
    if net.prefixlen != 24 or not net.subnet_of(POOL):
        return None
    return (int(net.network_address) - int(POOL.network_address)) >> 8


def link_name(net: ipaddress.IPv4Network) -> str:
    """The host link's name for ``net``: ``envbox<N>`` for the pool's N-th /24, else the
    network's address in hex and its prefix length in base 32 (15 characters, the kernel's most),
    so that two environments given the same subnet claim the same name."""
    i = pool_index(net)
    if i is not None:
        return f"{LINK_PREFIX}{i}"
    return f"{LINK_PREFIX}{int(net.network_address):08x}{_BASE32[net.prefixlen]}"


_BASE32 = "0123456789abcdefghijklmnopqrstuv"


def link_subnet(name: str) -> ipaddress.IPv4Network | None:
    """The subnet a host link named ``name`` claims (:func:`link_name`'s inverse; None if it is
    no such name). A link's name says its subnet even while the link is down (an idle
    environment's: no route then, and its address may lie outside a smaller subnet in it)."""
    rest = name.removeprefix(LINK_PREFIX)
    if rest == name:
        return None
    try:
        if rest.isdigit() and int(rest) < POOL_SIZE:
            return pool_subnet(int(rest))
        if len(rest) == 9 and rest[8] in _BASE32:
            return ipaddress.IPv4Network((int(rest[:8], 16), _BASE32.index(rest[8])))
    except ValueError:
        pass
    return None


def host_end(net: ipaddress.IPv4Network) -> str:
    """The host's address on ``net``: its last usable one (services take the first ones)."""
    return str(net.broadcast_address - 1)


def conflict(net: ipaddress.IPv4Network, routes: Iterable[netlink.Route],
             links: Iterable[str] = ()) -> str | None:  # fmt: skip
    """Why the host must not route ``net`` to an environment (None: it may): another
    environment's host link (``links``: the host's link names) whose subnet overlaps it, or a
    route or an address of the host's that does."""
    for name in links:
        other = link_subnet(name)
        if other is not None and other.overlaps(net) and name != link_name(net):
            return f"another environment on this host routes {other} (link {name})"
    for r in routes:
        dst = ipaddress.IPv4Network(r.network)
        if dst.prefixlen < 8 or not dst.overlaps(net):
            continue
        dev = _name(r.oif)
        if dev.startswith(LINK_PREFIX):
            return f"another environment on this host routes {dst} (link {dev})"
        what = "an address" if r.table == 255 and dst.prefixlen == 32 else "a route"
        return (f"the host has {what} in it ({dst} on {dev}, table {r.table}: a VPN or a proxy's "
                "fake-ip range?), which a route of ours would shadow")  # fmt: skip
    return None


def _name(oif: int | None) -> str:
    if oif is None:
        return "no device"
    try:
        return socket.if_indextoname(oif)
    except OSError:
        return f"link {oif}"


def make_link(hub: netlink.Netlink, bridge: int, host: netlink.Netlink, host_netns: int,
              net: ipaddress.IPv4Network) -> HostLink | None:  # fmt: skip
    """Claim ``net``: a veth pair from the hub's bridge (:data:`HUB_PORT`) to the host's
    namespace (:func:`link_name`), with the host's address on it (:func:`host_end`), down (up
    while an environment uses it, see network.py). None if another process holds it."""
    name = link_name(net)
    try:
        hub.add_veth(HUB_PORT, name, host_netns, master=bridge)
    except OSError as e:
        if e.errno == errno.EEXIST:
            return None
        raise
    port = hub.index(HUB_PORT)
    try:
        index = host.index(name)
        host.no_ipv6(index)
        address = host_end(net)
        host.add_address(index, address, net.prefixlen)
        hub.set_up(port)
    except BaseException:
        hub.del_link(port)
        raise
    return HostLink(name, index, address, net.prefixlen)


def claim_pool(hub: netlink.Netlink, bridge: int, host: netlink.Netlink, host_netns: int
               ) -> tuple[ipaddress.IPv4Network, HostLink | None, str | None]:  # fmt: skip
    """A free /24 of the pool for a hub, its host link made; or, when none is free, the first
    /24 unrouted, and why."""
    present = {n for n in os.listdir("/sys/class/net") if n.startswith(LINK_PREFIX)}  # not tried
    routes = host.routes()
    why = None
    for i in range(POOL_SIZE):
        net = pool_subnet(i)
        if link_name(net) in present:
            continue
        problem = conflict(net, routes, present)
        if problem is not None:
            why = why or problem
            continue
        link = make_link(hub, bridge, host, host_netns, net)
        if link is not None:
            return net, link, None
    return pool_subnet(0), None, (f"no /24 of {POOL} is free on this host ({why or 'all are taken'})")


def claim(hub: netlink.Netlink, bridge: int, host: netlink.Netlink, host_netns: int,
          net: ipaddress.IPv4Network) -> tuple[HostLink | None, str | None]:  # fmt: skip
    """Claim a configured subnet: its host link, or why it is not routed (never an error: two
    environments given the same subnet both run, the second one unrouted)."""
    links = [n for n in os.listdir("/sys/class/net") if n.startswith(LINK_PREFIX)]
    problem = conflict(net, host.routes(), links)
    if problem is not None:
        return None, problem
    link = make_link(hub, bridge, host, host_netns, net)
    if link is None:
        return None, f"another environment on this host routes {net} (link {link_name(net)})"
    return link, None


def survey(routes: Iterable[netlink.Route], present: Iterable[str]) -> tuple[int, int, str | None]:
    """For ``envbox doctor``: how many /24s of the pool environments on this host could take
    now, how many live ones hold (``present``: the host's link names), and why the first one
    skipped is (None if none is)."""
    names = set(present)
    routes = list(routes)
    free = held = 0
    why = None
    for i in range(POOL_SIZE):
        net = pool_subnet(i)
        if link_name(net) in names:
            held += 1
            continue
        problem = conflict(net, routes, names)
        if problem is None:
            free += 1
        else:
            why = why or problem
    return free, held, why
