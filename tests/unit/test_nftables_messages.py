"""Golden bytes for the nf_tables batch ``nftables.replace_table`` sends, and its ack reader; no
root, no netlink socket.

Each expected message is written out from the kernel's ABI, with the constants copied here by hand
from <linux/netfilter/nfnetlink.h>, <linux/netfilter/nf_tables.h>, <linux/netfilter.h> and
<linux/netfilter_bridge.h> (not imported from the module under test), and the length of every
expression, message and batch written as a number worked out by hand:

    struct nlmsghdr { __u32 len; __u16 type; __u16 flags; __u32 seq; __u32 pid; }
        type = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_*, or NFNL_MSG_BATCH_BEGIN/END
    struct nfgenmsg { __u8 nfgen_family; __u8 version; __be16 res_id; }
    struct nlattr   { __u16 nla_len; __u16 nla_type; }  payload padded to 4; nla_len without the
                    padding; NLA_F_NESTED on nested attributes; nf_tables' numbers are big-endian

Cross-checked by hand once (not needed to run these tests):
- the constants: a C program compiled against Debian's linux-libc-dev 6.1 headers printed them;
- the kernel took these batches (in a throwaway network namespace, as root): ``nft list ruleset``
  showed chains ``in``/``fwd``/``out`` as "type filter hook input/forward/output priority 0;
  policy accept" and the rules ``iifname "v1" drop``, ``iifname "v1" oifname "v2" drop``,
  ``oifname "v3" numgen random mod 100 < 25 drop`` in the chains expected below, and the batch
  with no drops left no table;
- ``nft --debug=netlink`` (nftables 1.0.6) prints the same expressions for the rules above,
  written in nft's own syntax, as for the ones the kernel held from these batches:
  ``[ meta load iifname => reg 1 ] [ cmp eq reg 1 0x00003176 0x00000000 0x00000000 0x00000000 ]
  [ numgen reg 1 = random mod 100 ] [ byteorder reg 1 = hton(reg 1, 4, 4) ]
  [ cmp lt reg 1 0x19000000 ] [ immediate reg 0 drop ]``. ``nft --debug=mnl`` shows nft's own
  messages with the same nesting and values, apart from attribute order in ``meta`` (KEY
  before DREG) and an explicit NFTA_NG_OFFSET 0 in ``numgen``.

The partition marks and the virtual addresses' NAT table (ip family) came later, on a host
without ``nft``: their expressions are written here from the same headers as nft 1.0.6 prints
them for ``meta mark set``, ``meta mark ==``, ``dnat to A:P`` and ``ct status dnat snat to A``,
and the kernel (6.18) takes these batches; tests/integration/test_virtual_address.py shows what
they do.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

import pytest

from pytest_envbox.kernel import nftables
from pytest_envbox.kernel.nftables import Drop

# <linux/netlink.h>
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
# <linux/netfilter/nfnetlink.h>
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFNETLINK_V0 = 0
# <linux/netfilter.h>, <linux/netfilter_bridge.h>
NFPROTO_BRIDGE = 7
NF_DROP, NF_ACCEPT = 0, 1
NF_BR_LOCAL_IN, NF_BR_FORWARD, NF_BR_LOCAL_OUT = 1, 2, 3
# <linux/netfilter/nf_tables.h>
NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE = 0, 2, 3, 6
NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY, NFTA_CHAIN_TYPE = 1, 3, 4, 5, 7
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NFTA_META_DREG, NFTA_META_KEY = 1, 2
NFT_META_IIFNAME, NFT_META_OIFNAME = 6, 7
NFTA_CMP_SREG, NFTA_CMP_OP, NFTA_CMP_DATA = 1, 2, 3
NFT_CMP_EQ, NFT_CMP_LT = 0, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE = 1
NFTA_NG_DREG, NFTA_NG_MODULUS, NFTA_NG_TYPE = 1, 2, 3
NFT_NG_RANDOM = 1
NFTA_BYTEORDER_SREG, NFTA_BYTEORDER_DREG, NFTA_BYTEORDER_OP = 1, 2, 3
NFTA_BYTEORDER_LEN, NFTA_BYTEORDER_SIZE = 4, 5
NFT_BYTEORDER_HTON = 1
NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA = 1, 2
NFT_REG_2 = 2
NFTA_META_SREG, NFT_META_MARK, NFT_META_L4PROTO = 3, 3, 16
NFT_CMP_NEQ = 1
NFTA_PAYLOAD_DREG, NFTA_PAYLOAD_BASE, NFTA_PAYLOAD_OFFSET, NFTA_PAYLOAD_LEN = 1, 2, 3, 4
NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 1, 2
NFTA_NAT_TYPE, NFTA_NAT_FAMILY, NFTA_NAT_REG_ADDR_MIN, NFTA_NAT_REG_PROTO_MIN = 1, 2, 3, 5
NFTA_NAT_FLAGS = 7
NFT_NAT_SNAT, NFT_NAT_DNAT = 0, 1
NF_NAT_RANGE_PROTO_SPECIFIED = 2  # <linux/netfilter/nf_nat.h>
NFTA_CT_DREG, NFTA_CT_KEY, NFT_CT_STATUS = 1, 2, 2
IPS_DST_NAT = 0x20  # <linux/netfilter/nf_conntrack_common.h>, 1 << IPS_DST_NAT_BIT
NFTA_BITWISE_SREG, NFTA_BITWISE_DREG, NFTA_BITWISE_LEN, NFTA_BITWISE_MASK, NFTA_BITWISE_XOR = 1, 2, 3, 4, 5
NFPROTO_IPV4 = 2
NF_INET_PRE_ROUTING, NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING = 0, 3, 4


def nla(kind: int, payload: bytes) -> bytes:
    """NLA_HDRLEN (4) + payload, padded to NLA_ALIGNTO (4); nla_len counts no padding."""
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def nest(kind: int, *attrs: bytes) -> bytes:
    return nla(kind | NLA_F_NESTED, b"".join(attrs))


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def sized(length: int, data: bytes) -> bytes:
    """``data``, checked against its length worked out by hand."""
    assert len(data) == length, (len(data), length)
    return data


def expr(length: int, name: str, *attrs: bytes) -> bytes:
    # NFTA_LIST_ELEM { NFTA_EXPR_NAME "name", NFTA_EXPR_DATA { ... } }
    return sized(length, nest(NFTA_LIST_ELEM, nla(NFTA_EXPR_NAME, name.encode() + b"\0"),
                              nest(NFTA_EXPR_DATA, *attrs)))  # fmt: skip


def port(key: int, name: str) -> bytes:
    """[ meta load iifname/oifname => reg 1 ] [ cmp eq reg 1 <name, 16 bytes zero-padded> ]"""
    return (
        expr(36, "meta", nla(NFTA_META_DREG, be32(NFT_REG_1)), nla(NFTA_META_KEY, be32(key)))
        + expr(56, "cmp", nla(NFTA_CMP_SREG, be32(NFT_REG_1)), nla(NFTA_CMP_OP, be32(NFT_CMP_EQ)),
               nest(NFTA_CMP_DATA, nla(NFTA_DATA_VALUE, name.encode().ljust(16, b"\0"))))
    )  # fmt: skip


def percent_below(percent: int) -> bytes:
    """[ numgen reg 1 = random mod 100 ] [ byteorder reg 1 = hton(reg 1, 4, 4) ]
    [ cmp lt reg 1 <percent, big-endian> ]"""
    return (
        expr(44, "numgen", nla(NFTA_NG_DREG, be32(NFT_REG_1)), nla(NFTA_NG_MODULUS, be32(100)),
             nla(NFTA_NG_TYPE, be32(NFT_NG_RANDOM)))
        + expr(64, "byteorder", nla(NFTA_BYTEORDER_SREG, be32(NFT_REG_1)),
               nla(NFTA_BYTEORDER_DREG, be32(NFT_REG_1)),
               nla(NFTA_BYTEORDER_OP, be32(NFT_BYTEORDER_HTON)),
               nla(NFTA_BYTEORDER_LEN, be32(4)), nla(NFTA_BYTEORDER_SIZE, be32(4)))
        + expr(44, "cmp", nla(NFTA_CMP_SREG, be32(NFT_REG_1)), nla(NFTA_CMP_OP, be32(NFT_CMP_LT)),
               nest(NFTA_CMP_DATA, nla(NFTA_DATA_VALUE, be32(percent))))
    )  # fmt: skip


# [ immediate reg 0 drop ]: DREG the verdict register, DATA { VERDICT { CODE NF_DROP } }
DROP = expr(48, "immediate", nla(NFTA_IMMEDIATE_DREG, be32(NFT_REG_VERDICT)),
            nest(NFTA_IMMEDIATE_DATA,
                 nest(NFTA_DATA_VERDICT, nla(NFTA_VERDICT_CODE, be32(NF_DROP)))))  # fmt: skip


def message(length: int, msg_type: int, flags: int, seq: int, *attrs: bytes,
            family: int = NFPROTO_BRIDGE) -> bytes:  # fmt: skip
    body = struct.pack("=BBH", family, NFNETLINK_V0, 0) + b"".join(attrs)  # nfgenmsg, res_id 0
    header = struct.pack("=IHHII", 16 + len(body), NFNL_SUBSYS_NFTABLES << 8 | msg_type,
                         NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0)  # fmt: skip
    return sized(length, header + body)


# Batch begin and end: family AF_UNSPEC, res_id = the subsystem, big-endian; only NLM_F_REQUEST.
BEGIN = struct.pack("=IHHII", 20, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, 0) + bytes([0, 0, 0, 10])


def end(seq: int) -> bytes:
    return struct.pack("=IHHII", 20, NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0) + bytes([0, 0, 0, 10])


TABLE = nla(NFTA_TABLE_NAME, b"envbox\0")  # 4 + 7, padded to 12
NEWTABLE = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWTABLE


def table_replaced(seq: int = 1) -> bytes:
    """NEWTABLE then DELTABLE: the table is gone afterwards, whether or not it was there."""
    return (message(32, NFT_MSG_NEWTABLE, NLM_F_CREATE, seq, TABLE)
            + message(32, NFT_MSG_DELTABLE, 0, seq + 1, TABLE))  # fmt: skip


def chain(seq: int, name: str, hook: int) -> bytes:
    return message(
        80, NFT_MSG_NEWCHAIN, NLM_F_CREATE, seq,
        nla(NFTA_CHAIN_TABLE, b"envbox\0"),
        nla(NFTA_CHAIN_NAME, name.encode() + b"\0"),
        nest(NFTA_CHAIN_HOOK, nla(NFTA_HOOK_HOOKNUM, be32(hook)), nla(NFTA_HOOK_PRIORITY, be32(0))),
        nla(NFTA_CHAIN_POLICY, be32(NF_ACCEPT)),
        nla(NFTA_CHAIN_TYPE, b"filter\0"),
    )  # fmt: skip


# Seqs 1-2 replace the table, 3 makes it again, 4-6 its chains (input, forward, output hooks).
TABLE_WITH_CHAINS = (table_replaced() + message(32, NFT_MSG_NEWTABLE, NLM_F_CREATE, 3, TABLE)
                     + chain(4, "in", NF_BR_LOCAL_IN) + chain(5, "fwd", NF_BR_FORWARD)
                     + chain(6, "out", NF_BR_LOCAL_OUT))  # fmt: skip


def rule(length: int, seq: int, chain_name: str, exprs: bytes) -> bytes:
    return message(length, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, seq,
                   nla(NFTA_RULE_TABLE, b"envbox\0"), nla(NFTA_RULE_CHAIN, chain_name.encode() + b"\0"),
                   nest(NFTA_RULE_EXPRESSIONS, exprs))  # fmt: skip


def encoded(drops: list[Drop]) -> bytes:
    return nftables.table_batch("envbox", drops).encode()


def test_constants_match_the_kernel_headers() -> None:
    assert nftables.NETLINK_NETFILTER == 12
    assert (nftables.NFNL_SUBSYS_NFTABLES, nftables.NFPROTO_BRIDGE) == (10, 7)
    assert (nftables.NF_BR_LOCAL_IN, nftables.NF_BR_FORWARD, nftables.NF_BR_LOCAL_OUT) == (1, 2, 3)
    assert (nftables.META_IIFNAME, nftables.META_OIFNAME, nftables.REG1) == (6, 7, 1)


def test_no_drops_removes_the_table() -> None:
    expected = sized(104, BEGIN + table_replaced() + end(3))
    assert encoded([]) == expected
    # The whole datagram, for a reader without the helpers above: len, type, flags, seq, pid;
    # nfgenmsg; attributes.
    assert expected.hex() == (
        "14000000" "1000" "0100" "00000000" "00000000" "0000000a"  # BATCH_BEGIN, res_id 10
        "20000000" "000a" "0504" "01000000" "00000000" "07000000"  # NEWTABLE, REQUEST|ACK|CREATE
        "0b000100" "656e76626f780000"  # NFTA_TABLE_NAME "envbox"
        "20000000" "020a" "0500" "02000000" "00000000" "07000000"  # DELTABLE, REQUEST|ACK
        "0b000100" "656e76626f780000"
        "14000000" "1100" "0100" "03000000" "00000000" "0000000a"  # BATCH_END, seq 3
    )


def test_one_drop_by_input_port() -> None:
    """In from ``v1``: in the input and forward chains; it can never match on output."""
    exprs = port(NFT_META_IIFNAME, "v1") + DROP
    expected = sized(744, BEGIN + TABLE_WITH_CHAINS
                     + rule(184, 7, "in", exprs) + rule(184, 8, "fwd", exprs) + end(9))  # fmt: skip
    assert encoded([Drop(iif="v1")]) == expected


def marks(i: int, name: str) -> bytes:
    """``iifname <name> meta mark set <the i-th port's mark>``: [ meta load iifname => reg 1 ]
    [ cmp eq reg 1 <name> ] [ immediate reg 1 <mark, host order> ] [ meta set mark with reg 1 ]"""
    return (port(NFT_META_IIFNAME, name)
            + expr(44, "immediate", nla(NFTA_IMMEDIATE_DREG, be32(NFT_REG_1)),
                   nest(NFTA_IMMEDIATE_DATA, nla(NFTA_DATA_VALUE, struct.pack("=I", MARK + i))))
            + expr(36, "meta", nla(NFTA_META_KEY, be32(NFT_META_MARK)),
                   nla(NFTA_META_SREG, be32(NFT_REG_1))))  # fmt: skip


def marked(i: int) -> bytes:
    """[ meta load mark => reg 1 ] [ cmp eq reg 1 <the i-th port's mark> ]"""
    return (expr(36, "meta", nla(NFTA_META_DREG, be32(NFT_REG_1)), nla(NFTA_META_KEY, be32(NFT_META_MARK)))
            + expr(44, "cmp", nla(NFTA_CMP_SREG, be32(NFT_REG_1)), nla(NFTA_CMP_OP, be32(NFT_CMP_EQ)),
                   nest(NFTA_CMP_DATA, nla(NFTA_DATA_VALUE, struct.pack("=I", MARK + i)))))  # fmt: skip


#: The mark of the first port a partition cuts off ("en" and 1), the next one's 2...
MARK = 0x656E0001


def test_one_drop_by_input_and_output_port() -> None:
    """From ``v1`` to ``v2``: bridged traffic in the forward chain; traffic the hub routes (in
    to the hub from ``v1``, out from it to ``v2``) by the mark it got on its way in."""
    exprs = port(NFT_META_IIFNAME, "v1") + port(NFT_META_OIFNAME, "v2") + DROP
    routed = marked(0) + port(NFT_META_OIFNAME, "v2") + DROP
    expected = sized(1132, BEGIN + TABLE_WITH_CHAINS + rule(216, 7, "in", marks(0, "v1"))
                     + rule(276, 8, "fwd", exprs) + rule(264, 9, "out", routed) + end(10))  # fmt: skip
    assert encoded([Drop(iif="v1", oif="v2")]) == expected
    assert nftables.partition_mark(0) == MARK


def test_percent_loss_both_ways_on_a_port() -> None:
    """25% loss on ``v3`` as the supervisor asks for it: in from it and out to it."""
    inbound = port(NFT_META_IIFNAME, "v3") + percent_below(25) + DROP
    outbound = port(NFT_META_OIFNAME, "v3") + percent_below(25) + DROP
    expected = sized(1720, BEGIN + TABLE_WITH_CHAINS
                     + rule(336, 7, "in", inbound) + rule(336, 8, "fwd", inbound)
                     + rule(336, 9, "fwd", outbound) + rule(336, 10, "out", outbound)
                     + end(11))  # fmt: skip
    assert encoded([Drop(iif="v3", percent=25), Drop(oif="v3", percent=25)]) == expected
    # numgen's value, turned big-endian, compared with 25 big-endian: "cmp lt reg 1 0x19000000"
    assert be32(25) == bytes.fromhex("00000019")


def test_partition_of_two_by_two() -> None:
    """{a, b} | {c, d} as the supervisor builds it: each input port's mark (in the order the
    ports come), then a forward rule and a routed one per direction per pair."""
    pairs = [("a", "c"), ("c", "a"), ("a", "d"), ("d", "a"),
             ("b", "c"), ("c", "b"), ("b", "d"), ("d", "b")]  # fmt: skip
    order = {"a": 0, "c": 1, "d": 2, "b": 3}
    rules = b"".join(rule(216, 7 + i, "in", marks(i, x)) for x, i in order.items())
    for i, (x, y) in enumerate(pairs):
        rules += rule(276, 11 + 2 * i, "fwd", port(NFT_META_IIFNAME, x) + port(NFT_META_OIFNAME, y) + DROP)
        rules += rule(264, 12 + 2 * i, "out", marked(order[x]) + port(NFT_META_OIFNAME, y) + DROP)
    expected = sized(5560, BEGIN + TABLE_WITH_CHAINS + rules + end(27))
    assert encoded([Drop(iif=x, oif=y) for x, y in pairs]) == expected


@pytest.mark.parametrize(("drop", "chains"), [
    (Drop(iif="x"), ["in", "fwd"]),
    (Drop(oif="x"), ["fwd", "out"]),
    (Drop(iif="x", oif="y"), ["in", "fwd", "out"]),  # its mark; bridged; routed
    (Drop(), ["in", "fwd", "out"]),
    (Drop(iif="x", percent=100), ["in", "fwd"]),
])  # fmt: skip
def test_which_chains_a_rule_goes_in(drop: Drop, chains: list[str]) -> None:
    batch = nftables.table_batch("envbox", [drop])
    rules = batch.msgs[6:]  # after table, table, table and three chains
    assert len(rules) == len(chains)
    for msg, name in zip(rules, chains, strict=True):
        assert nla(NFTA_RULE_CHAIN, name.encode() + b"\0") in msg
    if drop.percent >= 100:
        assert b"numgen" not in b"".join(rules)


# --- virtual addresses: the ip family's NAT table ---------------------------------------------

VIP_TABLE = nla(NFTA_TABLE_NAME, b"envbox-vip\0")  # 4 + 11, padded to 16


def vip_message(length: int, msg_type: int, flags: int, seq: int, *attrs: bytes) -> bytes:
    return message(length, msg_type, flags, seq, *attrs, family=NFPROTO_IPV4)


def nat_chain(length: int, seq: int, name: str, hook: int, priority: int) -> bytes:
    return vip_message(
        length, NFT_MSG_NEWCHAIN, NLM_F_CREATE, seq, VIP_TABLE,
        nla(NFTA_CHAIN_NAME, name.encode() + b"\0"),
        nest(NFTA_CHAIN_HOOK, nla(NFTA_HOOK_HOOKNUM, be32(hook)),
             nla(NFTA_HOOK_PRIORITY, struct.pack(">i", priority))),
        nla(NFTA_CHAIN_POLICY, be32(NF_ACCEPT)),
        nla(NFTA_CHAIN_TYPE, b"nat\0"),
    )  # fmt: skip


def payload(base: int, offset: int, length: int) -> bytes:
    """[ payload load <length>b @ <base> header + <offset> => reg 1 ]"""
    return expr(52, "payload", nla(NFTA_PAYLOAD_DREG, be32(NFT_REG_1)), nla(NFTA_PAYLOAD_BASE, be32(base)),
                nla(NFTA_PAYLOAD_OFFSET, be32(offset)), nla(NFTA_PAYLOAD_LEN, be32(length)))  # fmt: skip


def cmp(value: bytes, op: int = NFT_CMP_EQ) -> bytes:
    return expr(44, "cmp", nla(NFTA_CMP_SREG, be32(NFT_REG_1)), nla(NFTA_CMP_OP, be32(op)),
                nest(NFTA_CMP_DATA, nla(NFTA_DATA_VALUE, value)))  # fmt: skip


def load(reg: int, value: bytes) -> bytes:
    """[ immediate reg <reg> <value> ]"""
    return expr(44, "immediate", nla(NFTA_IMMEDIATE_DREG, be32(reg)),
                nest(NFTA_IMMEDIATE_DATA, nla(NFTA_DATA_VALUE, value)))  # fmt: skip


def dnat_rule(proto: int, modulus: int | None, backend: bytes, target: int) -> bytes:
    """``ip daddr 10.0.0.9 meta l4proto <proto> th dport 80 [numgen random mod <modulus> == 0]
    dnat to <backend>:<target>``, as nft --debug=netlink lists it: [ payload load 4b @ network
    header + 16 ] [ cmp ] [ meta load l4proto ] [ cmp ] [ payload load 2b @ transport header +
    2 ] [ cmp ] ([ numgen reg 1 = random mod n ] [ cmp eq reg 1 0 ]) [ immediate reg 1 addr ]
    [ immediate reg 2 port ] [ nat dnat ip addr_min reg 1 proto_min reg 2 flags 0x2 ]"""
    exprs = (payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4) + cmp(bytes([10, 0, 0, 9]))
             + expr(36, "meta", nla(NFTA_META_DREG, be32(NFT_REG_1)),
                    nla(NFTA_META_KEY, be32(NFT_META_L4PROTO)))
             + cmp(bytes([proto])) + payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2)
             + cmp(b"\x00\x50"))  # fmt: skip
    if modulus is not None:
        exprs += expr(44, "numgen", nla(NFTA_NG_DREG, be32(NFT_REG_1)), nla(NFTA_NG_MODULUS, be32(modulus)),
                      nla(NFTA_NG_TYPE, be32(NFT_NG_RANDOM))) + cmp(bytes(4))  # fmt: skip
    return (exprs + load(NFT_REG_1, backend) + load(NFT_REG_2, struct.pack(">H", target))
            + expr(56, "nat", nla(NFTA_NAT_TYPE, be32(NFT_NAT_DNAT)),
                   nla(NFTA_NAT_FAMILY, be32(NFPROTO_IPV4)),
                   nla(NFTA_NAT_REG_ADDR_MIN, be32(NFT_REG_1)), nla(NFTA_NAT_REG_PROTO_MIN, be32(NFT_REG_2)),
                   nla(NFTA_NAT_FLAGS, be32(NF_NAT_RANGE_PROTO_SPECIFIED))))  # fmt: skip


def nat_rule(length: int, seq: int, chain_name: str, exprs: bytes) -> bytes:
    return vip_message(length, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, seq, VIP_TABLE,
                       nla(NFTA_RULE_CHAIN, chain_name.encode() + b"\0"),
                       nest(NFTA_RULE_EXPRESSIONS, exprs))  # fmt: skip


def test_a_virtual_port_with_two_backends() -> None:
    """10.0.0.9:80 -> 10.0.0.2:8080 or 10.0.0.3:9090, TCP then UDP, in prerouting and output
    (dstnat, -100); the first backend with numgen mod 2 (probability 1/2), the last without;
    then postrouting (srcnat, 100): ``ct status & dnat != 0 snat to 10.0.0.1``."""
    f = nftables.Forward("10.0.0.9", 80, (("10.0.0.2", 8080), ("10.0.0.3", 9090)))
    expected = (BEGIN
                + vip_message(36, NFT_MSG_NEWTABLE, NLM_F_CREATE, 1, VIP_TABLE)
                + vip_message(36, NFT_MSG_DELTABLE, 0, 2, VIP_TABLE)
                + vip_message(36, NFT_MSG_NEWTABLE, NLM_F_CREATE, 3, VIP_TABLE)
                + nat_chain(80, 4, "pre", NF_INET_PRE_ROUTING, -100)
                + nat_chain(80, 5, "out", NF_INET_LOCAL_OUT, -100)
                + nat_chain(84, 6, "post", NF_INET_POST_ROUTING, 100))  # fmt: skip
    seq = 7
    for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        for length, modulus, backend, target in ((552, 2, bytes([10, 0, 0, 2]), 8080),
                                                 (464, None, bytes([10, 0, 0, 3]), 9090)):  # fmt: skip
            for chain_name in ("pre", "out"):
                expected += nat_rule(length, seq, chain_name, dnat_rule(proto, modulus, backend, target))
                seq += 1
    snat = (expr(32, "ct", nla(NFTA_CT_DREG, be32(NFT_REG_1)), nla(NFTA_CT_KEY, be32(NFT_CT_STATUS)))
            + expr(68, "bitwise", nla(NFTA_BITWISE_SREG, be32(NFT_REG_1)),
                   nla(NFTA_BITWISE_DREG, be32(NFT_REG_1)), nla(NFTA_BITWISE_LEN, be32(4)),
                   nest(NFTA_BITWISE_MASK, nla(NFTA_DATA_VALUE, struct.pack("=I", IPS_DST_NAT))),
                   nest(NFTA_BITWISE_XOR, nla(NFTA_DATA_VALUE, bytes(4))))
            + cmp(bytes(4), NFT_CMP_NEQ) + load(NFT_REG_1, bytes([10, 0, 0, 1]))
            + expr(40, "nat", nla(NFTA_NAT_TYPE, be32(NFT_NAT_SNAT)),
                   nla(NFTA_NAT_FAMILY, be32(NFPROTO_IPV4)),
                   nla(NFTA_NAT_REG_ADDR_MIN, be32(NFT_REG_1))))  # fmt: skip
    expected += nat_rule(280, seq, "post", snat) + end(seq + 1)
    assert nftables.nat_batch("envbox-vip", [f], "10.0.0.1").encode() == sized(4736, expected)


def test_no_forwards_removes_the_nat_table_and_fresh_skips_the_delete() -> None:
    expected = (BEGIN + vip_message(36, NFT_MSG_NEWTABLE, NLM_F_CREATE, 1, VIP_TABLE)
                + vip_message(36, NFT_MSG_DELTABLE, 0, 2, VIP_TABLE) + end(3))  # fmt: skip
    assert nftables.nat_batch("envbox-vip", [], "10.0.0.1").encode() == expected
    f = nftables.Forward("10.0.0.9", 80, (("10.0.0.2", 8080),))
    fresh = nftables.nat_batch("envbox-vip", [f], "10.0.0.1", fresh=True)
    assert len(fresh.msgs) == 1 + 3 + 4 + 1  # table, chains, 2 protocols x 2 chains, snat
    assert struct.unpack_from("=H", fresh.msgs[0], 4)[0] == NEWTABLE
    assert b"numgen" not in b"".join(fresh.msgs)  # one backend: taken always


# --- the ack reader --------------------------------------------------------------------------------


def ack(seq: int, code: int = 0) -> bytes:
    """NLMSG_ERROR: struct nlmsgerr (-errno, 0 for an ack) and the header it answers (a fake)."""
    return struct.pack("=IHHII", 36, NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -code) + bytes(16)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A datagram socketpair: ours, and one playing the kernel. A reader that waited for an ack
    never queued gets a timeout error instead of hanging."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.settimeout(10)
    with a, b:
        yield a, b


def test_send_sends_the_encoded_batch_and_reads_every_ack(
        pair: tuple[socket.socket, socket.socket]) -> None:  # fmt: skip
    ours, kernel = pair
    batch = nftables.table_batch("envbox", [Drop(iif="v1", oif="v2")])  # 9 messages
    kernel.send(ack(1) + ack(2))  # several in one datagram
    for seq in range(3, 10):
        kernel.send(ack(seq))
    batch.send(ours)
    assert kernel.recv(1 << 16) == encoded([Drop(iif="v1", oif="v2")]) == batch.encode()


def test_an_error_raises_with_its_errno_and_message(pair: tuple[socket.socket, socket.socket]) -> None:
    """The first error is raised, without waiting for acks the aborted batch never sends."""
    ours, kernel = pair
    batch = nftables.table_batch("envbox", [])
    kernel.send(ack(1) + ack(2, errno.EBUSY))
    with pytest.raises(OSError) as e:
        batch.send(ours)
    assert e.value.errno == errno.EBUSY
    assert e.value.strerror == "nf_tables (message 2): Device or resource busy"


def test_an_error_on_the_batch_itself_raises(pair: tuple[socket.socket, socket.socket]) -> None:
    """Refused at BATCH_BEGIN (sequence 0), e.g. without CAP_NET_ADMIN."""
    ours, kernel = pair
    kernel.send(ack(0, errno.EPERM))
    with pytest.raises(OSError) as e:
        nftables.table_batch("envbox", [Drop(iif="v1")]).send(ours)
    assert e.value.errno == errno.EPERM
