"""Environments' networks: each a hub (a namespace holding a bridge), services wired to it by
veth pairs, and the faults made on it (link state, delay, loss, partitions)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pytest_envbox.kernel import netlink, nftables
from pytest_envbox.supervisor.protocol import (
    Done,
    Handlers,
    HealRequest,
    LinkRequest,
    NetWiring,
    PartitionRequest,
    TcpCheckReply,
    TcpCheckRequest,
    Unsupported,
)

if TYPE_CHECKING:
    from pytest_envbox.supervisor.server import Supervisor
    from pytest_envbox.supervisor.services import Slot

__all__ = ["MAX_FREE_HUBS", "Hub", "HubAhead", "Network", "env_of", "network_error"]

#: Hubs of closed environments kept for the next ones (see Network.drop_hub).
MAX_FREE_HUBS = 4


@dataclass
class Hub:
    """An environment's network: a namespace of its own holding the bridge every service is on.

    Nothing of it is in the host's namespace: two environments (two xdist workers) may use the
    same subnet. When its environment ends, it is reset and kept for the next one (see
    ``Network.drop_hub``); closing ``netns`` frees it all: bridge, veths, addresses. So does
    the supervisor's death.
    """

    netns: int
    nl: netlink.Netlink
    bridge: int
    veths: int = 0  # veths made on it so far, also by earlier environments (names stay unique)
    gateway: tuple[str, int] | None = None  # its address on the environment's subnet
    #: faults made of drop rules (nftables.py): veth -> percent lost; partitions between groups
    loss: dict[str, int] = field(default_factory=dict)
    partitions: list[tuple[list[str], list[str]]] = field(default_factory=list)


class Network:
    """Every environment's hub, the hubs kept or made ahead for the next, and their faults."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.hubs: dict[str, Hub] = {}  # environment id -> its network
        self.ahead: HubAhead | None = None  # the next environment's hub (see hub)
        self.free: list[Hub] = []  # hubs of closed environments, reset for the next
        self.want = False  # only once an environment had a network

    def handlers(self) -> Handlers:
        return {LinkRequest: self.link, PartitionRequest: self.partition, HealRequest: self.heal,
                TcpCheckRequest: self.tcp_check}  # fmt: skip

    def top_up(self) -> None:
        """Have the next environment's hub made (the loop calls this when no start is in flight)."""
        if self.sup.running and self.want and self.ahead is None and not self.free:
            self.ahead = HubAhead()

    def spare_hubs(self) -> int:
        """Hubs ready for the next environments."""
        return len(self.free) + int(self.ahead is not None and self.ahead.ready())

    def wire(self, slot: str, netns: int, net: NetWiring) -> tuple[str, int]:
        """Put a new service on its environment's network: a veth pair, ``eth0`` inside with its
        address (and the subnet's route, no default route: nothing beyond the network), the
        other end on the environment's bridge. Four netlink requests (see netlink.py)."""
        hub = self.hub(env_of(slot), net)
        hub.veths += 1
        name = f"v{hub.veths}"
        index = netlink.attach(hub.nl, hub.bridge, name, netns, net.ip, net.prefix)
        return name, index

    def hub(self, env: str, net: NetWiring) -> Hub:
        """The environment's hub: the one made ahead if there is one (a new network namespace
        costs about a millisecond, and more while the kernel is freeing others), with its
        address now; its next one is made when the loop is idle (see serve)."""
        hub = self.hubs.get(env)
        if hub is not None:
            return hub
        if self.free:
            hub = self.free.pop()  # a closed environment's, reset (see drop_hub)
        else:
            ahead, self.ahead = self.ahead, None
            made = ahead.take() if ahead is not None else None
            if ahead is not None and made is None:
                self.want = False  # it failed: made on demand from now on (its error shown)
            hub = Hub(*(made or netlink.make_hub()))
            self.want = True
        gateway = (net.gateway, net.prefix)
        try:
            hub.nl.add_address(hub.bridge, *gateway)  # published ports reach services from here
        except BaseException:
            self.close_hub(hub)
            raise
        hub.gateway = gateway
        self.hubs[env] = hub
        return hub

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
        veths were cut off at their release (down) and go with their namespaces; here its
        address, its fault rules and its neighbour entries (the bridge goes down and up) go.
        """
        hub = self.hubs.pop(env, None)
        if hub is None:
            return
        if self.sup.running and not self.sup.detached and len(self.free) < MAX_FREE_HUBS:
            try:
                if hub.loss or hub.partitions:
                    netlink.call_in(hub.netns, lambda: nftables.replace_table("envbox", []))
                if hub.gateway is not None:
                    hub.nl.del_address(hub.bridge, *hub.gateway)
                hub.nl.set_up(hub.bridge, False)  # down and up: its neighbour entries are flushed
                hub.nl.set_up(hub.bridge, True)
            except Exception:
                pass  # not reusable: closed below
            else:
                self.free.append(Hub(hub.netns, hub.nl, hub.bridge, veths=hub.veths))
                return
        self.close_hub(hub)

    def close_hub(self, hub: Hub) -> None:
        hub.nl.close()
        os.close(hub.netns)

    def drop_spare_hubs(self) -> None:
        """The hub made ahead and the free ones go (detaching, tearing down)."""
        ahead, self.ahead = self.ahead, None
        made = ahead.take() if ahead is not None else None
        if made is not None:
            made[1].close()
            os.close(made[0])
        for hub in self.free:
            self.close_hub(hub)
        self.free.clear()

    # --- requests -----------------------------------------------------------------------------

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
            netlink.call_in(hub.netns, lambda: nftables.replace_table("envbox", list(drops)))
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

    A hub is a new network namespace with a bridge: two milliseconds or more of the kernel's
    time, which a probe's request arriving just after a start would otherwise wait out.
    """

    def __init__(self) -> None:
        self.done = threading.Event()
        self.hub: tuple[int, netlink.Netlink, int] | None = None
        threading.Thread(target=self._make, name="hub", daemon=True).start()

    def _make(self) -> None:
        try:
            self.hub = netlink.make_hub()
        except OSError:
            pass  # made on demand, then, and its error shown there
        finally:
            self.done.set()

    def ready(self) -> bool:
        """Whether it was made (waiting for the thread to end)."""
        self.done.wait()
        return self.hub is not None

    def take(self) -> tuple[int, netlink.Netlink, int] | None:
        self.done.wait()
        hub, self.hub = self.hub, None
        return hub


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
