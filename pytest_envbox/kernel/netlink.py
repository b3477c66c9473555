"""rtnetlink, just enough to wire an environment's network: links, veth pairs, a bridge, addresses.

Hand-written on purpose, chosen by measurement (``benchmarks/bench_network.py``): wiring one
service takes four netlink requests. pyroute2 costs about 300 ms to import (paid by the lean
supervisor at every start) and 6.9 ms per service here; ``ip -batch`` is 3.9 ms per service, most
of it starting the ``ip`` process; these few requests over a raw ``NETLINK_ROUTE`` socket take
well under a millisecond. The messages used are stable kernel ABI (``rtnetlink(7)``).

A netlink socket works in the network namespace it was *created* in, whatever the thread does
afterwards: :func:`open_in` makes one inside a namespace given by an fd.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pytest_envbox.kernel import linux as L

__all__ = [
    "IFA_ADDRESS",
    "IFA_LOCAL",
    "IFF_UP",
    "IFLA_ADDRESS",
    "IFLA_IFNAME",
    "IFLA_INFO_DATA",
    "IFLA_INFO_KIND",
    "IFLA_LINKINFO",
    "IFLA_MASTER",
    "IFLA_MTU",
    "IFLA_NET_NS_FD",
    "NLA_F_NESTED",
    "NLMSG_DONE",
    "NLMSG_ERROR",
    "NLM_F_ACK",
    "NLM_F_CREATE",
    "NLM_F_EXCL",
    "NLM_F_REPLACE",
    "NLM_F_REQUEST",
    "RTM_DELADDR",
    "RTM_DELLINK",
    "RTM_DELQDISC",
    "RTM_GETLINK",
    "RTM_GETROUTE",
    "RTM_NEWADDR",
    "RTM_NEWLINK",
    "RTM_NEWQDISC",
    "RTM_SETLINK",
    "TCA_KIND",
    "TCA_NETEM_JITTER64",
    "TCA_NETEM_LATENCY64",
    "TCA_OPTIONS",
    "TC_H_ROOT",
    "VETH_INFO_PEER",
    "Netlink",
    "Route",
    "addr_gen_none_request",
    "attach",
    "attr",
    "call_in",
    "clear_qdisc_request",
    "cstring",
    "del_address_request",
    "del_link_request",
    "encode",
    "getlink_request",
    "make_hub",
    "nested",
    "netem_request",
    "new_address_request",
    "new_bridge_request",
    "new_netns",
    "new_veth_request",
    "open_in",
    "parse_route",
    "route_dump_request",
    "set_up_request",
]

T = TypeVar("T")

# <linux/rtnetlink.h>, <linux/if_link.h>, <linux/if_addr.h>, <linux/veth.h>
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_GETROUTE = 26
RTM_NEWQDISC, RTM_DELQDISC = 36, 37
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
IFLA_AF_SPEC, IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE = 26, 8, 1
NLM_F_REPLACE = 0x100
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_NETEM_LATENCY64, TCA_NETEM_JITTER64 = 10, 11
TC_H_ROOT = 0xFFFFFFFF
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFLA_LINKINFO, IFLA_NET_NS_FD = 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFF_UP = 0x1
NLA_F_NESTED = 0x8000

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
_NETEM_QOPT = struct.Struct("=IIIIII")  # latency, limit, loss, gap, duplicate, jitter
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags


def attr(kind: int, data: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    n = 4 + len(data)
    return struct.pack("=HH", n, kind) + data + b"\0" * (-n % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def cstring(name: str) -> bytes:
    return name.encode() + b"\0"


def _ifaddr(index: int, address: str, prefixlen: int) -> bytes:
    """An IPv4 address on interface ``index``: the body of RTM_NEWADDR and RTM_DELADDR."""
    raw = socket.inet_pton(socket.AF_INET, address)
    return (_IFADDR.pack(socket.AF_INET, prefixlen, 0, 0, index) + attr(IFA_LOCAL, raw)
            + attr(IFA_ADDRESS, raw))  # fmt: skip


# --- requests, as bytes ---------------------------------------------------------------------
# Each request is built by a pure function of its arguments and its sequence number, apart from
# the socket that sends it: :class:`Netlink` sends exactly what these return, so the bytes can be
# checked against the kernel's struct layouts without a netlink socket or privileges.


def encode(kind: int, body: bytes, flags: int, *, seq: int) -> bytes:
    """One request: ``nlmsghdr`` (asking for an ack, port id 0: the kernel) and its body."""
    return _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq,
                       0) + body  # fmt: skip


def getlink_request(name: str, *, seq: int) -> bytes:
    """RTM_GETLINK for link ``name`` (looked up by name: index 0)."""
    return encode(RTM_GETLINK, _IFINFO.pack(0, 0, 0, 0, 0) + attr(IFLA_IFNAME, cstring(name)), 0,
                  seq=seq)  # fmt: skip


def new_bridge_request(name: str, *, seq: int, address: bytes | None = None) -> bytes:
    """RTM_NEWLINK making bridge ``name`` (EEXIST if it exists), with MAC ``address`` if given
    (else the kernel's: its ports' lowest, which changes as ports come and go)."""
    body = (_IFINFO.pack(0, 0, 0, 0, 0) + attr(IFLA_IFNAME, cstring(name))
            + (attr(IFLA_ADDRESS, address) if address is not None else b"")
            + nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, b"bridge\0")))  # fmt: skip
    return encode(RTM_NEWLINK, body, NLM_F_CREATE | NLM_F_EXCL, seq=seq)


def new_veth_request(name: str, peer: str, peer_netns: int, master: int | None = None, *,
                     seq: int) -> bytes:  # fmt: skip
    """RTM_NEWLINK making a veth pair: ``name`` here (on bridge ``master``), ``peer`` in the
    namespace of fd ``peer_netns`` (the peer's own ifinfomsg and attributes, in VETH_INFO_PEER)."""
    peer_info = (_IFINFO.pack(0, 0, 0, 0, 0) + attr(IFLA_IFNAME, cstring(peer))
                 + attr(IFLA_NET_NS_FD, struct.pack("=I", peer_netns)))  # fmt: skip
    attrs = [attr(IFLA_IFNAME, cstring(name))]
    if master is not None:
        attrs.append(attr(IFLA_MASTER, struct.pack("=I", master)))
    attrs.append(nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, b"veth\0"),
                         nested(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_info))))  # fmt: skip
    return encode(RTM_NEWLINK, _IFINFO.pack(0, 0, 0, 0, 0) + b"".join(attrs),
                  NLM_F_CREATE | NLM_F_EXCL, seq=seq)  # fmt: skip


def del_link_request(index: int, *, seq: int) -> bytes:
    """RTM_DELLINK of link ``index`` (a veth: both ends go)."""
    return encode(RTM_DELLINK, _IFINFO.pack(0, 0, index, 0, 0), 0, seq=seq)


def addr_gen_none_request(index: int, *, seq: int) -> bytes:
    """RTM_NEWLINK setting link ``index``'s IPv6 address generation to none: no link-local
    address, so no duplicate address detection in the kernel's workqueue (which holds the RTNL
    lock every other network change waits for), and nothing of IPv6 on the link at all."""
    spec = nested(IFLA_AF_SPEC, nested(socket.AF_INET6, attr(IFLA_INET6_ADDR_GEN_MODE,
                                                             bytes([IN6_ADDR_GEN_MODE_NONE]))))
    return encode(RTM_NEWLINK, _IFINFO.pack(0, 0, index, 0, 0) + spec, 0, seq=seq)


def route_dump_request(*, seq: int) -> bytes:
    """RTM_GETROUTE dump of every IPv4 route, in every table (the local one too: each address
    of the host is a route there)."""
    return encode(RTM_GETROUTE, _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0), NLM_F_DUMP,
                  seq=seq)  # fmt: skip


@dataclass(frozen=True)
class Route:
    """An IPv4 route as the kernel lists it: destination ``network`` (``"a.b.c.d/len"``), its
    output link's index (None for a blackhole, or a multipath route) and its table."""

    network: str
    oif: int | None
    table: int


def parse_route(payload: bytes) -> Route:
    """One RTM_NEWROUTE of a dump (its ``rtmsg`` and attributes)."""
    _family, dst_len, _src, _tos, table, _proto, _scope, _type, _flags = _RTMSG.unpack_from(payload)
    dst, oif = b"\0\0\0\0", None
    off = _RTMSG.size
    while off + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, off)
        if length < 4:
            break
        data = payload[off + 4: off + length]
        if kind == RTA_DST:
            dst = data[:4]
        elif kind == RTA_OIF:
            oif = struct.unpack("=I", data[:4])[0]
        elif kind == RTA_TABLE:
            table = struct.unpack("=I", data[:4])[0]
        off += (length + 3) & ~3
    return Route(f"{socket.inet_ntop(socket.AF_INET, dst)}/{dst_len}", oif, table)


def set_up_request(index: int, up: bool = True, *, seq: int) -> bytes:
    """RTM_NEWLINK changing only IFF_UP of link ``index`` (ifi_change says which flag)."""
    return encode(RTM_NEWLINK, _IFINFO.pack(0, 0, index, IFF_UP if up else 0, IFF_UP), 0, seq=seq)


def new_address_request(index: int, address: str, prefixlen: int, *, seq: int) -> bytes:
    """RTM_NEWADDR: IPv4 ``address``/``prefixlen`` on link ``index`` (EEXIST if it is there)."""
    return encode(RTM_NEWADDR, _ifaddr(index, address, prefixlen), NLM_F_CREATE | NLM_F_EXCL,
                  seq=seq)  # fmt: skip


def del_address_request(index: int, address: str, prefixlen: int, *, seq: int) -> bytes:
    """RTM_DELADDR: IPv4 ``address``/``prefixlen`` off link ``index``."""
    return encode(RTM_DELADDR, _ifaddr(index, address, prefixlen), 0, seq=seq)


def netem_request(index: int, delay_ms: float, jitter_ms: float = 0.0, *, seq: int) -> bytes:
    """RTM_NEWQDISC: netem as root qdisc 1: of link ``index``, replacing any (create or replace).

    The delay and jitter go in TCA_NETEM_LATENCY64/JITTER64 (nanoseconds), which the kernel
    prefers to tc_netem_qopt's tick fields (left 0).
    """
    # A queue of 10000 packets (tc's default is 1000): a delay at a high packet rate
    # should delay packets, not drop them.
    opts = _NETEM_QOPT.pack(0, 10000, 0, 0, 0, 0) + attr(
        TCA_NETEM_LATENCY64, struct.pack("=q", int(delay_ms * 1e6))) + attr(
        TCA_NETEM_JITTER64, struct.pack("=q", int(jitter_ms * 1e6)))  # fmt: skip
    body = (_TCMSG.pack(0, index, 0x10000, TC_H_ROOT, 0) + attr(TCA_KIND, b"netem\0")
            + attr(TCA_OPTIONS, opts))  # fmt: skip
    return encode(RTM_NEWQDISC, body, NLM_F_CREATE | NLM_F_REPLACE, seq=seq)


def clear_qdisc_request(index: int, *, seq: int) -> bytes:
    """RTM_DELQDISC of the root qdisc of link ``index``."""
    return encode(RTM_DELQDISC, _TCMSG.pack(0, index, 0, TC_H_ROOT, 0), 0, seq=seq)


class Netlink:
    """A ``NETLINK_ROUTE`` socket in the namespace it was created in; each request is acked.

    ``sock``: another transport with ``send``/``recv`` of whole datagrams (tests use a
    socketpair); by default a new ``NETLINK_ROUTE`` socket.
    """

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 socket.NETLINK_ROUTE)  # fmt: skip
            sock.bind((0, 0))
        self.sock = sock
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_seq(self) -> int:
        """The sequence number of the next request (each is numbered, so its ack is found)."""
        self.seq += 1
        return self.seq

    def request(self, msg: bytes, what: str = "") -> list[bytes]:
        """Send one encoded request (numbered by :meth:`next_seq`), wait for its ack; return the
        replies before it; raise ``OSError`` (errno, what) on a kernel error."""
        seq = _NLMSG.unpack_from(msg)[3]
        self.sock.send(msg)
        replies: list[bytes] = []
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, mtype, _flags, rseq, _pid = _NLMSG.unpack_from(data, off)
                payload = data[off + _NLMSG.size: off + length]
                off += (length + 3) & ~3
                if rseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, f"{what or 'netlink'}: {os.strerror(code)}")
                    return replies
                if mtype == NLMSG_DONE:
                    return replies
                replies.append(payload)

    # --- links ----------------------------------------------------------------------------

    def index(self, name: str) -> int:
        """The index of link ``name`` in this namespace."""
        replies = self.request(getlink_request(name, seq=self.next_seq()), f"link {name}")
        if not replies:
            raise OSError(errno.ENODEV, f"link {name}: no such device")
        return int(_IFINFO.unpack_from(replies[0], 0)[2])

    def add_bridge(self, name: str, address: bytes | None = None) -> None:
        self.request(new_bridge_request(name, seq=self.next_seq(), address=address),
                     f"create bridge {name}")  # fmt: skip

    def add_veth(self, name: str, peer: str, peer_netns: int, master: int | None = None) -> None:
        """A veth pair: ``name`` here (on bridge ``master``), ``peer`` in namespace ``peer_netns``."""
        self.request(new_veth_request(name, peer, peer_netns, master, seq=self.next_seq()),
                     f"create veth {name}/{peer}")  # fmt: skip

    def del_link(self, index: int) -> None:
        self.request(del_link_request(index, seq=self.next_seq()), f"delete link {index}")

    def no_ipv6(self, index: int) -> None:
        """No IPv6 address on link ``index``, ever (see :func:`addr_gen_none_request`)."""
        self.request(addr_gen_none_request(index, seq=self.next_seq()), f"link {index}: no IPv6")

    def routes(self) -> list[Route]:
        """Every IPv4 route of this namespace, in every table."""
        return [parse_route(r) for r in self.request(route_dump_request(seq=self.next_seq()),
                                                     "list routes")]  # fmt: skip

    def set_up(self, index: int, up: bool = True) -> None:
        self.request(set_up_request(index, up, seq=self.next_seq()),
                     f"set link {index} {'up' if up else 'down'}")  # fmt: skip

    def add_address(self, index: int, address: str, prefixlen: int) -> None:
        self.request(new_address_request(index, address, prefixlen, seq=self.next_seq()),
                     f"add address {address}")  # fmt: skip

    def del_address(self, index: int, address: str, prefixlen: int) -> None:
        self.request(del_address_request(index, address, prefixlen, seq=self.next_seq()),
                     f"delete address {address}")  # fmt: skip

    # --- queueing disciplines -----------------------------------------------------------------

    def netem(self, index: int, delay_ms: float, jitter_ms: float = 0.0) -> None:
        """Delay every packet leaving link ``index`` (netem as its root qdisc, replacing any).

        ENOENT when the kernel has no ``sch_netem`` (the kernel loads the module by itself
        where it has one).
        """
        self.request(netem_request(index, delay_ms, jitter_ms, seq=self.next_seq()),
                     "add netem qdisc")  # fmt: skip

    def clear_qdisc(self, index: int) -> None:
        """Back to the link's default qdisc (none to remove is fine)."""
        try:
            self.request(clear_qdisc_request(index, seq=self.next_seq()), "delete qdisc")
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EINVAL):
                raise


def _in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a short-lived thread of its own; its result, or its exception."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name="envbox-netns")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def call_in(netns: int, fn: Callable[[], T]) -> T:
    """``fn()`` with network namespace ``netns`` current: sockets it makes belong there.

    It runs in a thread that enters ``netns`` and then ends, never coming back: in rootless mode
    (a user namespace) nothing may enter the host's network namespace again, and the calling
    thread must stay there (published ports listen on the host's loopback). About 50 us.
    """

    def run() -> T:
        L.setns(netns, L.CLONE_NEWNET)
        return fn()

    return _in_thread(run)


def open_in(netns: int) -> Netlink:
    """A :class:`Netlink` socket that works in ``netns`` (made there, usable from anywhere)."""
    return call_in(netns, Netlink)


def new_netns(ipv6: bool = True) -> int:
    """A new, empty network namespace (its ``lo`` up); returns an fd that keeps it alive.

    ``ipv6=False``: IPv6 is off on every interface made there, so none of them gets a link-local
    address, whose duplicate address detection runs later in the kernel's workqueue, holding the
    RTNL lock that every other network change waits for.
    """

    def make() -> int:
        L.unshare(L.CLONE_NEWNET)
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if not ipv6:
            for conf in ("default", "all"):  # /proc/sys/net is this thread's namespace's
                path = f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"
                with contextlib.suppress(OSError), open(path, "w") as f:
                    f.write("1")
        L.loopback_up()
        return fd

    return _in_thread(make)


def make_hub() -> tuple[int, Netlink, int]:
    """An environment's hub, without its address yet: a new namespace with bridge ``br0`` up.

    Returns the namespace's fd, a netlink socket working there, and the bridge's index. The
    supervisor keeps one made ahead and gives it its address when an environment takes it.
    """
    fd = new_netns(ipv6=False)  # a hub speaks IPv4 only, to its services (see attach)
    try:
        nl = open_in(fd)
        try:
            # An address of its own: without one, a bridge takes its ports' lowest and changes
            # it as ports come and go. A released service's veth leaves when the kernel frees
            # its namespace, at a moment of the kernel's choosing: a service that had just learnt
            # the old address (from the ARP request before a relay's connect) sent its answers
            # to an address no port had any more, lost until the hub spoke again (seconds).
            nl.add_bridge("br0", address=bytes([os.urandom(1)[0] & 0xFC | 0x02]) + os.urandom(5))
            bridge = nl.index("br0")
            nl.set_up(bridge)
        except BaseException:
            nl.close()
            raise
    except BaseException:
        os.close(fd)
        raise
    return fd, nl, bridge


def attach(hub: Netlink, bridge: int, name: str, netns: int, ip: str, prefix: int) -> int:
    """Put namespace ``netns`` on the hub's bridge: veth ``name`` there, ``eth0`` with ``ip``
    inside (so the subnet's route and nothing else). Returns the index of ``name``."""
    hub.add_veth(name, "eth0", netns, master=bridge)
    index = hub.index(name)
    hub.set_up(index)
    with open_in(netns) as nl:
        eth0 = nl.index("eth0")
        nl.add_address(eth0, ip, prefix)
        nl.set_up(eth0)
    return index
