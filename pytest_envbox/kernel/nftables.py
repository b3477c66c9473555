"""nf_tables over netlink, just enough for an environment's network faults (drop rules on a
bridge) and its virtual addresses (destination NAT in the hub, as kube-proxy makes Services).

Hand-written on purpose: the ``nft`` command is not installed on minimal hosts and containers (it
is not on this project's own CI machine) although every current kernel has nf_tables, and
pyroute2's nftables support covers little of it (and costs ~300 ms to import). What is needed
is small: one table in the ``bridge`` family of an environment's own hub namespace, replaced as
a whole, atomically, in one netlink batch, whenever the faults change. Its rules match a bridge
port by name (``iifname``/``oifname``), optionally a random share of packets (``numgen``), and
drop. A second table, in the ``ip`` family (:func:`nat_batch`), sends connections to a virtual
address on to one of its backends. The messages are stable kernel ABI
(``linux/netfilter/nf_tables.h``).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_envbox.kernel.netlink import attr, cstring, nested

__all__ = [
    "META_IIFNAME",
    "META_L4PROTO",
    "META_MARK",
    "META_OIFNAME",
    "META_PROTOCOL",
    "NETLINK_NETFILTER",
    "NFNL_MSG_BATCH_BEGIN",
    "NFNL_MSG_BATCH_END",
    "NFNL_SUBSYS_NFTABLES",
    "NFPROTO_BRIDGE",
    "NFPROTO_IPV4",
    "NFT_MSG_DELTABLE",
    "NFT_MSG_NEWCHAIN",
    "NFT_MSG_NEWRULE",
    "NFT_MSG_NEWTABLE",
    "NFT_NAT_DNAT",
    "NFT_NAT_SNAT",
    "NF_ACCEPT",
    "NF_BR_FORWARD",
    "NF_BR_LOCAL_IN",
    "NF_BR_LOCAL_OUT",
    "NF_DROP",
    "NF_INET_LOCAL_OUT",
    "NF_INET_POST_ROUTING",
    "NF_INET_PRE_ROUTING",
    "NLMSG_ERROR",
    "NLM_F_ACK",
    "NLM_F_APPEND",
    "NLM_F_CREATE",
    "NLM_F_REQUEST",
    "PROTOCOLS",
    "REG1",
    "REG2",
    "Batch",
    "Drop",
    "Forward",
    "Guard",
    "flush_conntrack",
    "nat_batch",
    "partition_mark",
    "replace_nat_table",
    "replace_table",
    "table_batch",
]

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE = 0, 2, 3, 6
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800
NLMSG_ERROR = 2
NFPROTO_IPV4, NFPROTO_BRIDGE = 2, 7
# bridge hooks: traffic between two ports, from the hub's own stack out to a port, and in
NF_BR_LOCAL_IN, NF_BR_FORWARD, NF_BR_LOCAL_OUT = 1, 2, 3
NF_DROP, NF_ACCEPT = 0, 1
# ip hooks: before routing (in from the bridge), the hub's own sockets out, after routing
NF_INET_PRE_ROUTING, NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING = 0, 3, 4

_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big-endian)


# Netlink attributes are the same everywhere: one place makes them.


def _be32(v: int) -> bytes:
    return struct.pack(">I", v & 0xFFFFFFFF)


def _expr(name: str, *attrs: bytes) -> bytes:
    return nested(1, attr(1, cstring(name)), nested(2, *attrs))  # NFTA_LIST_ELEM{NAME, DATA}


REG1, REG2 = 1, 2  # NFT_REG_1, NFT_REG_2: 16-byte registers (an interface name fits)


def _ifname(hook_key: int, name: str) -> list[bytes]:
    """meta iifname/oifname == name (the kernel compares all 16 bytes, zero-padded)."""
    value = name.encode().ljust(16, b"\0")
    return [
        _expr("meta", attr(1, _be32(REG1)), attr(2, _be32(hook_key))),  # DREG, KEY
        _expr("cmp", attr(1, _be32(REG1)), attr(2, _be32(0)),  # SREG, OP eq
              nested(3, attr(1, value))),  # DATA{VALUE}
    ]


META_MARK, META_IIFNAME, META_OIFNAME = 3, 6, 7


def _random_below(percent: int) -> list[bytes]:
    """A random ``percent`` of packets: numgen random mod 100 < percent.

    numgen writes a host-order u32 and cmp compares bytes, so it is turned big-endian first (as
    nft itself does).
    """
    return [
        _expr("numgen", attr(1, _be32(REG1)), attr(2, _be32(100)), attr(3, _be32(1))),
        _expr("byteorder", attr(1, _be32(REG1)), attr(2, _be32(REG1)), attr(3, _be32(1)),
              attr(4, _be32(4)), attr(5, _be32(4))),  # SREG, DREG, OP hton, LEN, SIZE
        _expr("cmp", attr(1, _be32(REG1)), attr(2, _be32(2)),  # OP lt
              nested(3, attr(1, struct.pack(">I", percent)))),
    ]


def _verdict(code: int) -> bytes:
    return _expr("immediate", attr(1, _be32(0)),  # DREG verdict
                 nested(2, nested(2, attr(1, _be32(code)))))  # DATA{VERDICT{CODE}}


def _immediate(value: bytes, reg: int = REG1) -> bytes:
    """Load ``value`` into register ``reg``."""
    return _expr("immediate", attr(1, _be32(reg)), nested(2, attr(1, value)))  # DREG, DATA{VALUE}


def partition_mark(i: int) -> int:
    """The packet mark that stands for the ``i``-th port cut off by a partition (see table_batch)."""
    return 0x656E0000 + i + 1


def _drop() -> bytes:
    return _verdict(NF_DROP)


def _cmp(value: bytes, op: int = 0) -> bytes:
    """REG1 compared with ``value`` (op: 0 eq, 1 neq)."""
    return _expr("cmp", attr(1, _be32(REG1)), attr(2, _be32(op)), nested(3, attr(1, value)))


def _meta(key: int) -> bytes:
    return _expr("meta", attr(1, _be32(REG1)), attr(2, _be32(key)))


def _payload(base: int, offset: int, length: int) -> bytes:
    """Load ``length`` bytes at ``offset`` of a header (base 1: network, 2: transport) into REG1."""
    return _expr("payload", attr(1, _be32(REG1)), attr(2, _be32(base)), attr(3, _be32(offset)),
                 attr(4, _be32(length)))  # fmt: skip


META_PROTOCOL, META_L4PROTO = 1, 16
_ETH_IP, _ETH_ARP = b"\x08\x00", b"\x08\x06"
_NETWORK, _TRANSPORT = 1, 2
_TCP_SYN, _TCP_ACK = 0x02, 0x10
#: ICMP types a host may get back from a service: echo reply, unreachable, time exceeded,
#: parameter problem (answers to what it sent; never a request of the service's own)
_ICMP_ANSWERS = (0, 3, 11, 12)


@dataclass(frozen=True)
class Guard:
    """What services may send out of bridge port ``port`` (the link to the host): ARP, and, to
    ``address`` only (the host's end) and without IP options, TCP that opens nothing (no SYN
    without ACK) and ICMP answers. Nothing else: not a connection to any server of the host's,
    not a packet for the host to route elsewhere (to another environment), nor any IPv6.

    Stateless on purpose: conntrack in the bridge family (``nf_conntrack_bridge``) would track
    every frame of every environment's bridge, services' traffic and published ports included,
    in the host's shared connection table, and would drop packets it finds out of window, which a
    lossy or delayed link makes. A replying TCP segment needs no state to be told apart from an
    opening one. UDP is the price: a service's UDP answers to the host are dropped too.
    """

    port: str
    address: str

    def rules(self) -> list[list[bytes]]:
        """Each rule's expressions, in order: the allowed kinds accepted, then the rest dropped."""
        accept = _verdict(NF_ACCEPT)
        out = _ifname(META_OIFNAME, self.port)
        # No IP options: a source route (LSRR/SSRR) would have the host forward the packet on,
        # to another environment, where it accepts source routes (accept_source_route).
        to_host = [*out, _meta(META_PROTOCOL), _cmp(_ETH_IP),
                   _payload(_NETWORK, 16, 4), _cmp(socket.inet_aton(self.address)),
                   _payload(_NETWORK, 0, 1), _cmp(b"\x45")]  # fmt: skip
        rules = [
            [*out, _meta(META_PROTOCOL), _cmp(_ETH_ARP), accept],
            [*to_host, _meta(META_L4PROTO), _cmp(bytes([socket.IPPROTO_TCP])),
             _payload(_TRANSPORT, 13, 1),
             _expr("bitwise", attr(1, _be32(REG1)), attr(2, _be32(REG1)), attr(3, _be32(1)),
                   nested(4, attr(1, bytes([_TCP_SYN | _TCP_ACK]))), nested(5, attr(1, b"\0"))),
             _cmp(bytes([_TCP_SYN]), op=1), accept],
        ]  # fmt: skip
        for kind in _ICMP_ANSWERS:
            rules.append([*to_host, _meta(META_L4PROTO), _cmp(bytes([socket.IPPROTO_ICMP])),
                          _payload(_TRANSPORT, 0, 1), _cmp(bytes([kind])), accept])  # fmt: skip
        rules.append([*out, _drop()])
        return rules


@dataclass(frozen=True)
class Drop:
    """Drop packets in from port ``iif`` and/or out to port ``oif``: all of them, or ``percent``."""

    iif: str | None = None
    oif: str | None = None
    percent: int = 100


class Batch:
    """One atomic nf_tables transaction over a ``NETLINK_NETFILTER`` socket."""

    def __init__(self) -> None:
        self.msgs: list[bytes] = []
        self.seq = 0

    def add(self, msg_type: int, family: int, flags: int, *attrs: bytes) -> None:
        self.seq += 1
        body = _NFGEN.pack(family, 0, 0) + b"".join(attrs)
        kind = (NFNL_SUBSYS_NFTABLES << 8) | msg_type
        self.msgs.append(_NLMSG.pack(_NLMSG.size + len(body), kind,
                                     NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, 0) + body)  # fmt: skip

    def encode(self) -> bytes:
        """The whole transaction as one datagram, exactly as :meth:`send` sends it: the
        messages between NFNL_MSG_BATCH_BEGIN (sequence 0) and NFNL_MSG_BATCH_END (the last
        message's sequence + 1), both addressed to the nf_tables subsystem (res_id)."""
        begin = _NLMSG.pack(_NLMSG.size + 4, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, 0) + \
            _NFGEN.pack(0, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
        end = _NLMSG.pack(_NLMSG.size + 4, NFNL_MSG_BATCH_END, NLM_F_REQUEST, self.seq + 1, 0) + \
            _NFGEN.pack(0, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
        return begin + b"".join(self.msgs) + end

    def send(self, sock: socket.socket) -> None:
        """Send the batch, read one ack per message; raise ``OSError`` on the first error."""
        sock.send(self.encode())
        pending = set(range(1, self.seq + 1))
        error: OSError | None = None
        while pending:
            data = sock.recv(65536)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, mtype, _flags, seq, _pid = _NLMSG.unpack_from(data, off)
                payload = data[off + _NLMSG.size: off + length]
                off += (length + 3) & ~3
                if mtype == NLMSG_ERROR:
                    pending.discard(seq)
                    code = -struct.unpack_from("=i", payload)[0]
                    if code and error is None:
                        error = OSError(code, f"nf_tables (message {seq}): {os.strerror(code)}")
                        pending.clear()  # the kernel aborted the batch: no more acks
        if error is not None:
            raise error


def table_batch(name: str, drops: Sequence[Drop], guard: Guard | None = None, *,
                fresh: bool = False) -> Batch:  # fmt: skip
    """The batch that makes bridge table ``name`` hold exactly ``drops``, then ``guard``'s rules
    (see :func:`replace_table`). ``fresh``: the table does not exist yet (a new hub), so it is
    only made: the add-then-delete that clears an old one costs the delete's wait for the
    kernel's RCU grace period (15 ms here, against 0.5 ms for the whole batch without it).

    Pure, apart from the socket that sends it (``table_batch(...).encode()`` are the bytes sent),
    so its messages can be checked against the kernel's ABI without privileges.
    """
    b = Batch()
    table = attr(1, cstring(name))  # NFTA_TABLE_NAME
    if not fresh:
        # add-then-delete makes the delete succeed whether or not the table existed.
        b.add(NFT_MSG_NEWTABLE, NFPROTO_BRIDGE, NLM_F_CREATE, table)
        b.add(NFT_MSG_DELTABLE, NFPROTO_BRIDGE, 0, table)
    if drops or guard is not None:
        b.add(NFT_MSG_NEWTABLE, NFPROTO_BRIDGE, NLM_F_CREATE, table)
        chains = {"in": NF_BR_LOCAL_IN, "fwd": NF_BR_FORWARD, "out": NF_BR_LOCAL_OUT}
        for chain, hook in chains.items():
            b.add(NFT_MSG_NEWCHAIN, NFPROTO_BRIDGE, NLM_F_CREATE,
                  attr(1, cstring(name)), attr(3, cstring(chain)),  # TABLE, NAME
                  nested(4, attr(1, _be32(hook)), attr(2, _be32(0))),  # HOOK{NUM, PRIORITY}
                  attr(5, _be32(NF_ACCEPT)), attr(7, cstring("filter")))  # POLICY, TYPE
        # Traffic the hub routes (to a virtual address, see nat_batch) crosses the bridge twice:
        # in from one port to the hub ("in"), then out from the hub to another ("out"), never
        # "fwd"; the output hook has no input port. A rule between two ports holds for it too:
        # each packet in from such a port is marked with it, and the mark stands for the port.
        marked = list(dict.fromkeys(d.iif for d in drops if d.iif is not None and d.oif is not None))
        for i, port in enumerate(marked):
            b.add(NFT_MSG_NEWRULE, NFPROTO_BRIDGE, NLM_F_CREATE | NLM_F_APPEND,
                  attr(1, cstring(name)), attr(2, cstring("in")),
                  nested(4, *_ifname(META_IIFNAME, port), _immediate(struct.pack("=I", partition_mark(i))),
                         _expr("meta", attr(2, _be32(META_MARK)), attr(3, _be32(REG1)))))  # KEY, SREG
        for d in drops:
            exprs: list[bytes] = []
            if d.iif is not None:
                exprs += _ifname(META_IIFNAME, d.iif)
            if d.oif is not None:
                exprs += _ifname(META_OIFNAME, d.oif)
            if d.percent < 100:
                exprs += _random_below(d.percent)
            exprs.append(_drop())
            # A rule with an input port cannot match in "out", one with an output port not in "in".
            for chain in chains:
                if (chain == "out" and d.iif is not None) or (chain == "in" and d.oif is not None):
                    continue
                b.add(NFT_MSG_NEWRULE, NFPROTO_BRIDGE, NLM_F_CREATE | NLM_F_APPEND,
                      attr(1, cstring(name)), attr(2, cstring(chain)),  # TABLE, CHAIN
                      nested(4, *exprs))  # EXPRESSIONS
            if d.iif is not None and d.oif is not None:  # routed by the hub: its mark, in "out"
                exprs = [_meta(META_MARK), _cmp(struct.pack("=I", partition_mark(marked.index(d.iif)))),
                         *exprs[2:]]  # fmt: skip
                b.add(NFT_MSG_NEWRULE, NFPROTO_BRIDGE, NLM_F_CREATE | NLM_F_APPEND,
                      attr(1, cstring(name)), attr(2, cstring("out")), nested(4, *exprs))
        # Faults first: they hit the test's direct traffic as any other. The guard watches what
        # leaves towards the host: forwarded by the bridge, or routed back out by the hub's own
        # stack (which forwards when the host does: a new namespace inherits ip_forward).
        for rule in guard.rules() if guard is not None else []:
            for chain in ("fwd", "out"):
                b.add(NFT_MSG_NEWRULE, NFPROTO_BRIDGE, NLM_F_CREATE | NLM_F_APPEND,
                      attr(1, cstring(name)), attr(2, cstring(chain)), nested(4, *rule))
    return b


def replace_table(name: str, drops: Sequence[Drop], guard: Guard | None = None, *,
                  fresh: bool = False) -> None:  # fmt: skip
    """Make bridge table ``name`` hold exactly ``drops`` and ``guard``, atomically, in this
    thread's netns.

    The table has the three bridge hooks a hub's traffic crosses: forward (service to service),
    output (the hub's own sockets, i.e. published ports, to a service) and input (back).
    """
    _send(table_batch(name, drops, guard, fresh=fresh))


def _send(b: Batch) -> None:
    """Send a batch over a netfilter socket of this thread's netns."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_NETFILTER) as sock:  # fmt: skip
        # One ack per message: hundreds of rules (a partition of many services) overflow the
        # default receive buffer (ENOBUFS, after the kernel applied the batch). The batch is one
        # datagram, which must fit the send buffer (EMSGSIZE): 400 pairs cut off are 220 kB.
        # SO_RCVBUFFORCE/SO_SNDBUFFORCE (root), else what is allowed (rmem_max/wmem_max).
        for options in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
            for opt in options:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, max(16 << 20, 2 * len(b.encode())))
                    break
                except OSError:
                    continue
        sock.bind((0, 0))
        b.send(sock)


# --- virtual addresses: destination NAT in the hub ------------------------------------------------

NFT_NAT_SNAT, NFT_NAT_DNAT = 0, 1
_NF_NAT_RANGE_PROTO_SPECIFIED = 2
_CT_STATUS, _IPS_DST_NAT = 2, 0x20  # NFT_CT_STATUS; IPS_DST_NAT (host order, as ct loads it)
#: Protocols a virtual port forwards: a Service's port is TCP or UDP (DNS is both).
PROTOCOLS = (socket.IPPROTO_TCP, socket.IPPROTO_UDP)


@dataclass(frozen=True)
class Forward:
    """TCP and UDP to ``address``:``port`` go on to one of ``backends`` (address, port each),
    chosen at random per connection, as kube-proxy's iptables mode chooses: the i-th of n taken
    with probability 1/(n-i), so each with 1/n."""

    address: str
    port: int
    backends: tuple[tuple[str, int], ...]


def _nat(kind: int, with_port: bool) -> bytes:
    """snat/dnat to the address in REG1 (and the port, big-endian, in REG2)."""
    # TYPE, FAMILY, REG_ADDR_MIN (then REG_PROTO_MIN, FLAGS)
    attrs = [attr(1, _be32(kind)), attr(2, _be32(NFPROTO_IPV4)), attr(3, _be32(REG1))]
    if with_port:
        attrs += [attr(5, _be32(REG2)), attr(7, _be32(_NF_NAT_RANGE_PROTO_SPECIFIED))]
    return _expr("nat", *attrs)


def _forward_rules(f: Forward) -> list[list[bytes]]:
    """One rule per protocol and backend: ``ip daddr A meta l4proto P th dport N [numgen random
    mod (n-i) == 0] dnat to B:M``; the last backend's without numgen (it takes what is left)."""
    rules = []
    for proto in PROTOCOLS:
        match = [_payload(_NETWORK, 16, 4), _cmp(socket.inet_aton(f.address)),
                 _meta(META_L4PROTO), _cmp(bytes([proto])),
                 _payload(_TRANSPORT, 2, 2), _cmp(struct.pack(">H", f.port))]  # fmt: skip
        n = len(f.backends)
        for i, (address, port) in enumerate(f.backends):
            pick = [] if i == n - 1 else [
                _expr("numgen", attr(1, _be32(REG1)), attr(2, _be32(n - i)), attr(3, _be32(1))),
                _cmp(b"\0\0\0\0")]  # 0 in either byte order  # fmt: skip
            rules.append([*match, *pick, _immediate(socket.inet_aton(address)),
                          _immediate(struct.pack(">H", port), REG2), _nat(NFT_NAT_DNAT, True)])  # fmt: skip
    return rules


def nat_batch(name: str, forwards: Sequence[Forward], source: str, *, fresh: bool = False) -> Batch:
    """The batch that makes ``ip`` table ``name`` hold exactly ``forwards`` (none: no table).

    Chains ``pre`` (packets in from the bridge) and ``out`` (the hub's own sockets: rootless
    mode's lent ones) choose the backend (dnat); ``post`` has every connection so sent on come
    from ``source`` (the hub's address): client and backend are on the same bridge, and the
    backend must answer through the hub, which undoes the translation, not to the client direct.
    ``fresh`` as for :func:`table_batch`.
    """
    b = Batch()
    table = attr(1, cstring(name))
    if not fresh:
        b.add(NFT_MSG_NEWTABLE, NFPROTO_IPV4, NLM_F_CREATE, table)
        b.add(NFT_MSG_DELTABLE, NFPROTO_IPV4, 0, table)
    if not forwards:
        return b
    b.add(NFT_MSG_NEWTABLE, NFPROTO_IPV4, NLM_F_CREATE, table)
    chains = {"pre": (NF_INET_PRE_ROUTING, -100), "out": (NF_INET_LOCAL_OUT, -100),
              "post": (NF_INET_POST_ROUTING, 100)}  # dstnat and srcnat priorities  # fmt: skip
    for chain, (hook, priority) in chains.items():
        b.add(NFT_MSG_NEWCHAIN, NFPROTO_IPV4, NLM_F_CREATE, table, attr(3, cstring(chain)),
              nested(4, attr(1, _be32(hook)), attr(2, _be32(priority))),
              attr(5, _be32(NF_ACCEPT)), attr(7, cstring("nat")))  # fmt: skip
    for f in forwards:
        for rule in _forward_rules(f):
            for chain in ("pre", "out"):
                b.add(NFT_MSG_NEWRULE, NFPROTO_IPV4, NLM_F_CREATE | NLM_F_APPEND,
                      table, attr(2, cstring(chain)), nested(4, *rule))
    dnatted = [_expr("ct", attr(1, _be32(REG1)), attr(2, _be32(_CT_STATUS))),  # DREG, KEY
               _expr("bitwise", attr(1, _be32(REG1)), attr(2, _be32(REG1)), attr(3, _be32(4)),
                     nested(4, attr(1, struct.pack("=I", _IPS_DST_NAT))),
                     nested(5, attr(1, b"\0\0\0\0"))),
               _cmp(b"\0\0\0\0", op=1)]  # fmt: skip
    b.add(NFT_MSG_NEWRULE, NFPROTO_IPV4, NLM_F_CREATE | NLM_F_APPEND, table, attr(2, cstring("post")),
          nested(4, *dnatted, _immediate(socket.inet_aton(source)), _nat(NFT_NAT_SNAT, False)))
    return b


def replace_nat_table(name: str, forwards: Sequence[Forward], source: str, *,
                      fresh: bool = False) -> None:  # fmt: skip
    """Make ``ip`` table ``name`` hold exactly ``forwards`` (:func:`nat_batch`), atomically, in
    this thread's netns."""
    _send(nat_batch(name, forwards, source, fresh=fresh))


_CTNETLINK_DELETE = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE


def flush_conntrack() -> None:
    """Empty this thread's netns's IPv4 connection table (ctnetlink's delete, without a tuple:
    all of them), as ``conntrack -F`` does."""
    body = _NFGEN.pack(socket.AF_INET, 0, 0)
    msg = _NLMSG.pack(_NLMSG.size + len(body), _CTNETLINK_DELETE, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_NETFILTER) as sock:  # fmt: skip
        sock.bind((0, 0))
        sock.send(msg)
        data = sock.recv(65536)
        _length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data)
        code = -struct.unpack_from("=i", data, _NLMSG.size)[0] if mtype == NLMSG_ERROR else 0
        if code:
            raise OSError(code, f"ctnetlink: {os.strerror(code)}")
