"""Virtual addresses: Kubernetes Services as kube-proxy makes them, in an environment's hub.

A virtual address is an address of the environment's subnet that no service has; a connection
to one of its ports goes on to one of that port's backends (a service's address and port),
chosen at random per connection. The hub holds it all, in its own namespace, where no service
can undo it:

- the address on the bridge (``/32``), so that the hub answers ARP for it;
- forwarding on the bridge, and no ICMP redirects: a connection comes in on the bridge and goes
  out on it again, to the backend, and the hub must not tell the client to go there direct
  (and, where the kernel has br_netfilter, bridged frames kept out of the ip family's hooks);
- nf_tables table :data:`TABLE` in the ``ip`` family (:func:`nftables.nat_batch`): destination
  NAT to the backend, and the connection's source turned into the hub's own address, so that
  the backend answers through the hub (client and backend are on the same bridge).

The faults' table (bridge family, network.py) still applies: a lossy or downed link hits the
packets in and out of the hub, and a partition marks what comes in from a cut-off port so that
its rules hold for routed packets too (see :func:`nftables.table_batch`).

From the test process: root mode routes the subnet to the hub, so a connection to a virtual
address is made as any other (TCP; the host link's guard drops UDP answers to the host).
Rootless, a socket lent by the hub (``env.network.reachable()``) connects from the hub itself:
its ``out`` chain translates those too.

A hub reset for the next environment loses them all (:func:`clear`, from ``drop_hub``).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pytest_envbox.kernel import netlink, nftables
from pytest_envbox.supervisor import subnets
from pytest_envbox.supervisor.protocol import Done, Handlers, Unsupported, VirtualAddressRequest

if TYPE_CHECKING:
    from pytest_envbox.supervisor.network import Hub
    from pytest_envbox.supervisor.server import Supervisor

__all__ = ["TABLE", "Vips", "Virtual", "clear"]

#: The hub's table of virtual addresses (the faults' own is "envbox", in the bridge family).
TABLE = "envbox-vip"
#: The hub's sysctls (under /proc/sys/net) a virtual address needs, and their values then. The
#: last one exists where the kernel has br_netfilter: it would hand bridged frames to the ip
#: family's hooks, and a connection sent on to a backend on the same bridge would be bridged
#: (br_netfilter's own DNAT path), not routed: the hub's behaviour would depend on the host's.
_SYSCTLS = {"ipv4/conf/br0/forwarding": "1", "ipv4/conf/all/send_redirects": "0",
            "ipv4/conf/br0/send_redirects": "0", "bridge/bridge-nf-call-iptables": "0"}  # fmt: skip


@dataclass
class Virtual:
    """A hub's virtual addresses (address -> its ports' forwards) and the sysctls as they were
    before the first (put back with the last)."""

    forwards: dict[str, list[nftables.Forward]] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)


class Vips:
    """The virtual addresses of every environment (each kept on its hub, as a :class:`Virtual`)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def handlers(self) -> Handlers:
        return {VirtualAddressRequest: self.virtual_address}

    def virtual_address(self, req_id: int, req: VirtualAddressRequest) -> Done:
        """Make ``req.address`` lead to its ports' backends (replacing what it had), or, with no
        ports, remove it."""
        hub = self.sup.network.hubs.get(req.env)
        if hub is None or hub.subnet is None or hub.gateway is None:
            raise ValueError("the environment has no network (it is not open)")
        taken = {s.ip for slot, s in self.sup.services.slots.items()
                 if slot.split("/", 1)[0] == req.env and s.ip is not None}  # fmt: skip
        address = _address(hub.subnet, hub.gateway[0], req.address, taken)
        forwards = [_forward(hub.subnet, address, port, backends) for port, backends in req.ports]
        ports = [f.port for f in forwards]
        if len(set(ports)) != len(ports):
            raise ValueError(f"virtual address {address}: a port given twice in {sorted(ports)}")
        want = {a: f for a, f in (hub.vips.forwards if hub.vips else {}).items() if a != address}
        if forwards:
            want[address] = forwards
        apply(hub, want)
        return Done()


def _address(net: ipaddress.IPv4Network, gateway: str, text: str, taken: set[str]) -> str:
    """``text`` as a virtual address of ``net``, or why it cannot be one."""
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"virtual address {text!r} is not an IPv4 address") from None
    if ip not in net or ip in (net.network_address, net.broadcast_address):
        raise ValueError(f"virtual address {ip} is not a host address of the subnet {net}")
    if str(ip) in (gateway, subnets.host_end(net)):
        raise ValueError(f"virtual address {ip} is the hub's or the host's address on {net}")
    if str(ip) in taken:
        raise ValueError(f"virtual address {ip} is a service's address")
    return str(ip)


def _forward(net: ipaddress.IPv4Network, address: str, port: int,
             backends: list[tuple[str, int]]) -> nftables.Forward:  # fmt: skip
    """One port's forward, checked: ports 1-65535, backends on the subnet (the hub reaches no
    other), at least one."""
    for p in (port, *(t for _, t in backends)):
        if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536:
            raise ValueError(f"virtual address {address}: port {p!r} is not from 1 to 65535")
    if not backends:
        raise ValueError(f"virtual address {address}: port {port} has no backend")
    for a, _ in backends:
        try:
            ok = ipaddress.IPv4Address(a) in net and a != address
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"virtual address {address}: backend {a!r} is not another address of {net}")
    return nftables.Forward(address, port, tuple((str(ipaddress.IPv4Address(a)), t) for a, t in backends))


def apply(hub: Hub, want: dict[str, list[nftables.Forward]]) -> None:
    """Make the hub's virtual addresses ``want``: its table first (one atomic batch: on failure
    nothing changed), then the addresses on the bridge and the sysctls.

    The table exists exactly while ``hub.vips`` does (set as soon as the table is made, so that
    :func:`clear` removes it whatever fails after): without, it is only made, not replaced (the
    delete of a replacement waits for the kernel's RCU grace period, 15 ms here).
    """
    if hub.vips is None and not want:
        return  # nothing there
    vips = hub.vips or Virtual()
    source = hub.gateway[0] if hub.gateway is not None else "0.0.0.0"  # (no forwards then)
    forwards = [f for fs in want.values() for f in fs]
    fresh = hub.vips is None
    try:
        netlink.call_in(hub.netns, lambda: nftables.replace_nat_table(TABLE, forwards, source, fresh=fresh))
    except OSError as e:
        if e.errno in (errno.EPROTONOSUPPORT, errno.ENOENT, errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
            raise Unsupported(
                "virtual addresses need nf_tables with NAT, connection tracking and numgen in "
                "the ip family (CONFIG_NF_TABLES, CONFIG_NF_TABLES_IPV4, CONFIG_NFT_NAT, "
                "CONFIG_NFT_CT, CONFIG_NFT_NUMGEN, CONFIG_NF_NAT, CONFIG_NF_CONNTRACK; the kernel "
                f"said: {e.strerror}): load them with `modprobe nft_nat nft_ct nft_numgen`, or "
                "use a kernel that has them (every major distribution's does)") from None
        raise
    if want:
        hub.vips = vips
        if not vips.sysctls:
            vips.sysctls = netlink.call_in(hub.netns, lambda: _sysctls(_SYSCTLS))
    for address in sorted(want.keys() - vips.forwards.keys()):
        hub.nl.add_address(hub.bridge, address, 32)
        vips.forwards[address] = []  # there: removed by the next apply, whatever happens now
    for address in sorted(vips.forwards.keys() - want.keys()):
        hub.nl.del_address(hub.bridge, address, 32)
        del vips.forwards[address]
    vips.forwards = dict(want)
    if not want:
        hub.vips = None
        netlink.call_in(hub.netns, lambda: _sysctls(vips.sysctls))
        # Connections made through it keep their translation in the hub's connection table:
        # a later one with the same addresses and ports (the next environment's) would reuse it.
        with contextlib.suppress(OSError):
            netlink.call_in(hub.netns, nftables.flush_conntrack)


def clear(hub: Hub) -> None:
    """The hub is reset for another environment: its virtual addresses go, and all they made."""
    if hub.vips is not None:
        apply(hub, {})


def _sysctls(values: dict[str, str]) -> dict[str, str]:
    """Write this thread's netns's ``net`` sysctls; return what they were (a bridge one that
    does not exist is left out)."""
    before = {}
    for key, value in values.items():
        try:
            f = open(f"/proc/sys/net/{key}", "r+")  # noqa: SIM115
        except FileNotFoundError:
            if key.startswith("bridge/"):
                continue
            raise
        with f:
            before[key] = f.read().strip()
            f.seek(0)
            f.write(value)
    return before
