"""Environments' networks: each a hub (a namespace holding a bridge), services wired to it by
veth pairs, the link that routes its subnet from the host (:mod:`.subnets`), and the faults made
on it (link state, delay, loss, partitions)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pytest_envbox.kernel import netlink, nftables
from pytest_envbox.supervisor import subnets, vips
from pytest_envbox.supervisor.protocol import (
    Done,
    Handlers,
    HealRequest,
    LendRequest,
    LinkRequest,
    NetWiring,
    NetworkReply,
    NetworkRequest,
    PartitionRequest,
    TcpCheckReply,
    TcpCheckRequest,
    Unsupported,
)

if TYPE_CHECKING:
    from pytest_envbox.supervisor.server import Supervisor
    from pytest_envbox.supervisor.services import Slot

__all__ = ["MAX_FREE_HUBS", "ROOTLESS", "Hub", "HubAhead", "Network", "address", "env_of",
           "network_error", "new_hub"]  # fmt: skip

#: Hubs of closed environments kept for the next ones (see Network.drop_hub).
MAX_FREE_HUBS = 4
#: Why a rootless run's subnets are not routed from the host.
ROOTLESS = ("rootless mode: the supervisor may not add links or routes to the host's network "
            "namespace; reach service addresses with `with env.network.reachable():`")  # fmt: skip


@dataclass
class Hub:
    """An environment's network: a namespace of its own holding the bridge every service is on,
    and the link that routes its subnet from the host (root mode).

    When its environment ends, it is reset and kept for the next one, subnet, address and host
    link included (see ``Network.drop_hub``); closing ``netns`` frees it all: bridge, veths, the
    host link (the kernel deletes a veth pair with either end's namespace), addresses. So does
    the supervisor's death.
    """

    netns: int
    nl: netlink.Netlink
    bridge: int
    veths: int = 0  # veths made on it so far, also by earlier environments (names stay unique)
    gateway: tuple[str, int] | None = None  # its address on the environment's subnet
    subnet: ipaddress.IPv4Network | None = None
    pooled: bool = False  # its subnet is one of the host's free ones (not a configured one)
    link: subnets.HostLink | None = None  # its link from the host, when routed
    why: str | None = None  # why it is not routed
    #: faults made of drop rules (nftables.py): veth -> percent lost; partitions between groups
    loss: dict[str, int] = field(default_factory=dict)
    partitions: list[tuple[list[str], list[str]]] = field(default_factory=list)
    vips: vips.Virtual | None = None  # its virtual addresses (Kubernetes Services, see vips.py)

    def guard(self) -> nftables.Guard | None:
        """What keeps services from reaching the host through its link (see nftables.Guard)."""
        return None if self.link is None else nftables.Guard(subnets.HUB_PORT, self.link.address)


class Network:
    """Every environment's hub, the hubs kept or made ahead for the next, and their faults."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.hubs: dict[str, Hub] = {}  # environment id -> its network
        self.ahead: HubAhead | None = None  # the next environment's hub (see bind)
        self.free: list[Hub] = []  # hubs of closed environments, reset for the next
        self.want = False  # only once an environment had a network
        # Root mode: the host's namespace (ours), where each hub's link has its other end.
        self.host_netns: int | None = None
        self.host: netlink.Netlink | None = None
        if "in-userns" not in sys.argv:
            with contextlib.suppress(OSError):
                self.host = netlink.Netlink()
                self.host_netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def handlers(self) -> Handlers:
        return {LinkRequest: self.link, PartitionRequest: self.partition, HealRequest: self.heal,
                TcpCheckRequest: self.tcp_check, NetworkRequest: self.network,
                LendRequest: self.lend}  # fmt: skip

    def top_up(self) -> None:
        """Have the next environment's hub made (the loop calls this when no start is in flight)."""
        if self.sup.running and self.want and self.ahead is None and not self.free:
            self.ahead = HubAhead(self.host_netns, self._taken())

    def spare_hubs(self) -> int:
        """Hubs ready for the next environments."""
        return len(self.free) + int(self.ahead is not None and self.ahead.ready())

    def wire(self, slot: str, netns: int, net: NetWiring) -> tuple[str, int]:
        """Put a new service on its environment's network: a veth pair, ``eth0`` inside with its
        address (and the subnet's route, no default route: nothing beyond the network), the
        other end on the environment's bridge. Four netlink requests (see netlink.py)."""
        env = env_of(slot)
        hub = self.hubs.get(env)
        if hub is None:  # not asked for first (see network): the subnet the address is on
            hub = self.bind(env, str(ipaddress.IPv4Interface(f"{net.ip}/{net.prefix}").network))
        hub.veths += 1
        name = f"v{hub.veths}"
        index = netlink.attach(hub.nl, hub.bridge, name, netns, net.ip, net.prefix)
        return name, index

    def bind(self, env: str, want: str | None) -> Hub:
        """The environment's hub, with subnet ``want`` (None: one of the host's free ones).

        A hub kept from a closed environment, best one with the subnet wanted (its address and
        host link are ready: only the link goes up), or the one made ahead (a new network
        namespace costs about a millisecond, and more while the kernel is freeing others); its
        next one is made when the loop is idle (see top_up).
        """
        hub = self.hubs.get(env)
        if hub is not None:
            return hub
        net = None if want is None else ipaddress.IPv4Network(want)
        hub = self._take(net)
        try:
            if hub.subnet is None or (hub.subnet != net if net is not None else not hub.pooled):
                self._readdress(hub, net)
            if hub.link is not None and self.host is not None:
                self.host.set_up(hub.link.index)  # its route appears
        except BaseException:
            self.close_hub(hub)
            raise
        self.hubs[env] = hub
        return hub

    def _take(self, net: ipaddress.IPv4Network | None) -> Hub:
        """A hub for an environment that wants ``net``: kept, made ahead, or new."""
        for i in reversed(range(len(self.free))):  # the latest first: its pages are warm
            hub = self.free[i]
            if (hub.subnet == net) if net is not None else hub.pooled:
                return self.free.pop(i)
        if self.free:
            return self.free.pop()  # a closed environment's, reset (see drop_hub)
        ahead, self.ahead = self.ahead, None
        made = ahead.take() if ahead is not None else None
        if ahead is not None and made is None:
            self.want = False  # it failed: made on demand from now on (its error shown)
            return new_hub(net, self.host_netns, self._taken())
        self.want = True
        return made or new_hub(net, self.host_netns, self._taken())

    def _readdress(self, hub: Hub, net: ipaddress.IPv4Network | None) -> None:
        """Give a hub another subnet: its host link and address go, new ones come."""
        if hub.link is not None:
            if self.host is not None:
                self.host.del_link(hub.link.index)  # both ends
            hub.link = None
            netlink.call_in(hub.netns, lambda: nftables.replace_table("envbox", []))
        if hub.gateway is not None:
            hub.nl.del_address(hub.bridge, *hub.gateway)
            hub.gateway = None
        address(hub, net, self.host_netns, self._taken())

    def _taken(self) -> set[ipaddress.IPv4Network]:
        """The subnets this supervisor's hubs have (rootless mode keeps them apart by this)."""
        return {h.subnet for h in (*self.hubs.values(), *self.free) if h.subnet is not None}

    def via(self, slot: str, s: Slot) -> tuple[int, str] | None:
        """Where a relay reaches the service from: its hub's namespace and the service's
        address, when it is on a network."""
        hub = self.hubs.get(env_of(slot))
        return (hub.netns, s.ip) if hub is not None and s.ip is not None else None

    def cut(self, slot: str, s: Slot) -> None:
        """A released service's veth goes down at once (its hub is reset later, see drop_hub)."""
        hub = self.hubs.get(env_of(slot))
        if hub is not None and s.veth_index:
            # Its hub will be reused: its veth is cut off now (down: nothing crosses it
            # any more), and deleted with the service's namespace, by the kernel, later.
            # (Deleting it here would wait ten milliseconds or more for the kernel.)
            with contextlib.suppress(OSError):
                hub.nl.set_up(s.veth_index, False)

    def drop_hub(self, env: str) -> None:
        """The environment's network is done with: its hub is reset and kept for the next one.

        Destroying a namespace with a bridge in it holds the kernel's RTNL lock for tens of
        milliseconds (seen here: 50 to 160 ms, every third or fourth time), and every network
        change of every other start waits for it. A reset hub is as good as new: the services'
        veths were cut off at their release (down) and go with their namespaces; here its fault
        rules and its neighbour entries (the bridge goes down and up) go, and its host link goes
        down: its route goes, and the host's neighbour entries with it. Its subnet, address and
        host link stay for the next environment.
        """
        hub = self.hubs.pop(env, None)
        if hub is None:
            return
        if self.sup.running and not self.sup.detached and len(self.free) < MAX_FREE_HUBS:
            try:
                vips.clear(hub)
                if hub.loss or hub.partitions:
                    netlink.call_in(hub.netns, lambda: nftables.replace_table("envbox", [], hub.guard()))
                if hub.link is not None and self.host is not None:
                    self.host.set_up(hub.link.index, False)
                hub.nl.set_up(hub.bridge, False)  # down and up: its neighbour entries are flushed
                hub.nl.set_up(hub.bridge, True)
            except Exception:
                pass  # not reusable: closed below
            else:
                self.free.append(Hub(hub.netns, hub.nl, hub.bridge, veths=hub.veths,
                                     gateway=hub.gateway, subnet=hub.subnet, pooled=hub.pooled,
                                     link=hub.link, why=hub.why))  # fmt: skip
                return
        self.close_hub(hub)

    def close_hub(self, hub: Hub) -> None:
        """Free a hub. Its host link goes down first, so that its route goes at once (the
        kernel deletes the link itself with the namespace, a little later)."""
        if hub.link is not None and self.host is not None:
            with contextlib.suppress(OSError):
                self.host.set_up(hub.link.index, False)
        hub.nl.close()
        os.close(hub.netns)

    def drop_spare_hubs(self) -> None:
        """The hub made ahead and the free ones go (detaching, tearing down)."""
        ahead, self.ahead = self.ahead, None
        made = ahead.take() if ahead is not None else None
        if made is not None:
            self.close_hub(made)
        for hub in self.free:
            self.close_hub(hub)
        self.free.clear()

    def host_links(self) -> list[str]:
        """The names of the host links of every hub of ours (in use, kept, made ahead)."""
        ahead = self.ahead.hub if self.ahead is not None and self.ahead.done.is_set() else None
        hubs = [*self.hubs.values(), *self.free, *([ahead] if ahead is not None else [])]
        return sorted(h.link.name for h in hubs if h.link is not None)

    # --- requests -----------------------------------------------------------------------------

    def network(self, req_id: int, req: NetworkRequest) -> NetworkReply | Done:
        """The environment's network, made now; or, ``drop``, freed (when no service is on it)."""
        if req.drop:
            if not any(env_of(slot) == req.env for slot in self.sup.services.slots):
                self.drop_hub(req.env)
            return Done()
        try:
            hub = self.bind(req.env, req.subnet)
        except OSError as e:
            raise network_error(e) from None
        return NetworkReply(str(hub.subnet), hub.link is not None, hub.why)

    def lend(self, req_id: int, req: LendRequest) -> Done:
        """TCP sockets made in the environment's hub, sent to the test process (rootless mode's
        way to service addresses, see engine/reach.py): a socket stays in the namespace it was
        made in, wherever it goes, so the test process connects it to a service's address."""
        hub = self.hubs.get(req.env)
        if hub is None:
            raise ValueError("the environment has no network (it is not open)")
        if self.sup.fds is None:
            raise Unsupported("this supervisor has no descriptor socket to send sockets over")
        count = max(1, min(req.count, 64))
        socks = netlink.call_in(hub.netns, lambda: [socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                                                    for _ in range(count)])  # fmt: skip
        try:
            socket.send_fds(self.sup.fds, [b"s"], [s.fileno() for s in socks])
        finally:
            for s in socks:
                s.close()  # in flight, the kernel holds them
        return Done()

    def tcp_check(self, req_id: int, req: TcpCheckRequest) -> TcpCheckReply:
        """Does ``port`` accept a connection on the service's loopback, in its namespace?"""
        s = self.sup.services.slots[req.slot]

        def make() -> list[tuple[socket.socket, str]]:
            socks = []
            addrs = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
            if s.ip is not None:  # a service may listen on its network address only
                addrs.append((socket.AF_INET, s.ip))
            for family, addr in addrs:
                with contextlib.suppress(OSError):  # no IPv6 on this host: IPv4 only
                    socks.append((socket.socket(family, socket.SOCK_STREAM), addr))
            return socks

        socks = netlink.call_in(s.netns_fd, make)
        ok = False
        for sk, addr in socks:
            with sk:
                sk.settimeout(0.2)  # loopback answers at once; a full backlog is "not yet"
                if not ok:
                    with contextlib.suppress(OSError):
                        sk.connect((addr, req.port))
                        ok = True
        return TcpCheckReply(ok)

    def link(self, req_id: int, req: LinkRequest) -> Done:
        """A fault on the service's link, applied on the hub's end of its veth pair.

        ``down``/``up``: the link state (the service's ``eth0`` loses its carrier). ``delay``:
        netem on the hub's end, so packets *to* the service wait (a round trip grows by the
        delay). ``loss``: a drop rule on the bridge for that share of packets, each way.
        ``clear``: none of these, link up. The service, without CAP_NET_ADMIN, can undo none.
        """
        slot, action = req.slot, req.action
        s = self.sup.services.slots.get(slot)
        hub = self.hubs.get(env_of(slot))
        if s is None or hub is None or s.veth is None:
            raise ValueError("the service is not on a network (it has not been started)")
        if action in ("down", "up"):
            hub.nl.set_up(s.veth_index, action == "up")
        elif action == "delay":
            try:
                hub.nl.netem(s.veth_index, req.delay_ms, req.jitter_ms)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise Unsupported(
                        "link.delay() needs the kernel's netem queueing discipline "
                        "(sch_netem), which this kernel does not have: load it with `modprobe "
                        "sch_netem` (Debian and Ubuntu ship it in linux-modules-extra or the "
                        "stock kernel), or use a kernel built with CONFIG_NET_SCH_NETEM") from None
                raise
        elif action == "loss":
            loss = {k: v for k, v in hub.loss.items() if k != s.veth}
            if req.percent:
                loss[s.veth] = req.percent
            self._apply_faults(hub, loss=loss)
        elif action == "clear":
            hub.nl.clear_qdisc(s.veth_index)
            hub.nl.set_up(s.veth_index, True)
            if s.veth in hub.loss:
                self._apply_faults(hub, loss={k: v for k, v in hub.loss.items() if k != s.veth})
        else:
            raise ValueError(f"unknown link action {action!r}")
        return Done()

    def partition(self, req_id: int, req: PartitionRequest) -> Done:
        """Drop all traffic between the services of group ``a`` and those of group ``b``."""
        env = req.env
        hub = self.hubs.get(env)
        if hub is None:
            raise ValueError("the environment has no network yet (no service was started)")
        veths = []
        for group in (req.a, req.b):
            names = []
            for name in group:
                s = self.sup.services.slots.get(f"{env}/{name}")
                if s is None or s.veth is None:
                    raise ValueError(f"service {name!r} is not on the network (never started)")
                names.append(s.veth)
            veths.append(names)
        cut = (sorted(veths[0]), sorted(veths[1]))
        if cut not in hub.partitions and cut[::-1] not in hub.partitions:
            self._apply_faults(hub, partitions=[*hub.partitions, cut])
        return Done()

    def heal(self, req_id: int, req: HealRequest) -> Done:
        hub = self.hubs.get(req.env)
        if hub is not None and hub.partitions:
            self._apply_faults(hub, partitions=[])
        return Done()

    def _apply_faults(self, hub: Hub, loss: dict[str, int] | None = None,
                      partitions: list[tuple[list[str], list[str]]] | None = None) -> None:  # fmt: skip
        """Make the hub's drop rules say ``loss`` and ``partitions`` (one atomic batch); they
        become the hub's faults only once the kernel took them."""
        loss = hub.loss if loss is None else loss
        partitions = hub.partitions if partitions is None else partitions
        drops: dict[nftables.Drop, None] = {}  # ordered, without duplicates
        for veth, percent in sorted(loss.items()):
            drops[nftables.Drop(iif=veth, percent=percent)] = None
            drops[nftables.Drop(oif=veth, percent=percent)] = None
        for group_a, group_b in partitions:
            for x in group_a:
                for y in group_b:
                    drops[nftables.Drop(iif=x, oif=y)] = None
                    drops[nftables.Drop(iif=y, oif=x)] = None
        try:
            netlink.call_in(hub.netns, lambda: nftables.replace_table("envbox", list(drops), hub.guard()))
            hub.loss, hub.partitions = dict(loss), list(partitions)
        except OSError as e:
            if e.errno in (errno.EPROTONOSUPPORT, errno.ENOENT, errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
                raise Unsupported(
                    "link.loss() and network.partition() need nf_tables with its "
                    "bridge family and numgen (CONFIG_NF_TABLES, CONFIG_NF_TABLES_BRIDGE, "
                    f"CONFIG_NFT_NUMGEN; the kernel said: {e.strerror}): load them with "
                    "`modprobe nf_tables nft_numgen nf_tables_bridge`, or use a kernel that "
                    "has them (every major distribution's does)") from None
            raise


class HubAhead:
    """The next environment's hub, made on a thread of its own while the loop serves requests.

    A hub is a new network namespace with a bridge, and its host link: two milliseconds or more
    of the kernel's time, which a probe's request arriving just after a start would otherwise
    wait out.
    """

    def __init__(self, host_netns: int | None, taken: set[ipaddress.IPv4Network]) -> None:
        self.done = threading.Event()
        self.hub: Hub | None = None
        threading.Thread(target=self._make, args=(host_netns, taken), name="hub", daemon=True).start()

    def _make(self, host_netns: int | None, taken: set[ipaddress.IPv4Network]) -> None:
        try:
            self.hub = new_hub(None, host_netns, taken)
        except OSError:
            pass  # made on demand, then, and its error shown there
        finally:
            self.done.set()

    def ready(self) -> bool:
        """Whether it was made (waiting for the thread to end)."""
        self.done.wait()
        return self.hub is not None

    def take(self) -> Hub | None:
        self.done.wait()
        hub, self.hub = self.hub, None
        return hub


def new_hub(net: ipaddress.IPv4Network | None, host_netns: int | None,
            taken: set[ipaddress.IPv4Network]) -> Hub:  # fmt: skip
    """A new hub (netlink.make_hub) with its subnet (see :func:`address`)."""
    hub = Hub(*netlink.make_hub())
    try:
        address(hub, net, host_netns, taken)
    except BaseException:
        hub.nl.close()
        os.close(hub.netns)
        raise
    return hub


def address(hub: Hub, net: ipaddress.IPv4Network | None, host_netns: int | None,
            taken: set[ipaddress.IPv4Network]) -> None:  # fmt: skip
    """Give a hub subnet ``net`` (None: one of the host's free ones), its first address on the
    bridge, and in root mode its host link with the guard that goes with it (see
    :mod:`.subnets`). Rootless, nothing is made on the host: the subnet is only kept apart from
    the other hubs' (``taken``), so that ``reachable()`` can tell environments apart.
    """
    link: subnets.HostLink | None = None
    why: str | None = ROOTLESS
    pooled = net is None
    if host_netns is None:
        if net is None:
            net = next((n for n in map(subnets.pool_subnet, range(subnets.POOL_SIZE))
                        if n not in taken), subnets.pool_subnet(0))  # fmt: skip
    else:
        with netlink.Netlink() as host:  # its own: the hub maker's thread and the loop's
            if net is None:
                net, link, why = subnets.claim_pool(hub.nl, hub.bridge, host, host_netns)
            else:
                link, why = subnets.claim(hub.nl, hub.bridge, host, host_netns, net)
    hub.pooled = pooled
    gateway = (str(next(net.hosts())), net.prefixlen)
    hub.nl.add_address(hub.bridge, *gateway)  # published ports reach services from here
    hub.subnet, hub.gateway, hub.link, hub.why = net, gateway, link, why
    if link is not None:  # no table yet: a new hub's, or cleared (see _readdress, drop_hub)
        netlink.call_in(hub.netns, lambda: nftables.replace_table("envbox", [], hub.guard(), fresh=True))


def network_error(e: OSError) -> Exception:
    """Why an environment's network could not be made, and what to do (:class:`Unsupported`
    when the kernel lacks what it needs)."""
    if e.errno in (errno.EOPNOTSUPP, errno.ENOENT, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
        return Unsupported(f"the environment's private network needs bridge and veth devices "
                           f"in the kernel (CONFIG_BRIDGE, CONFIG_VETH; the kernel said: {e}): load "
                           "them with `modprobe bridge veth`, or use a kernel that has them (every "
                           "major distribution's does)")  # fmt: skip
    return ValueError(f"the environment's network could not be set up: {e}")


def env_of(slot: str) -> str:
    """A slot is ``<environment id>/<service>``."""
    return slot.split("/", 1)[0]
