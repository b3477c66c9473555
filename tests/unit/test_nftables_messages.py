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


def message(length: int, msg_type: int, flags: int, seq: int, *attrs: bytes) -> bytes:
    body = struct.pack("=BBH", NFPROTO_BRIDGE, NFNETLINK_V0, 0) + b"".join(attrs)  # nfgenmsg, res_id 0
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


def test_one_drop_by_input_and_output_port() -> None:
    """From ``v1`` to ``v2``: forwarded traffic only."""
    exprs = port(NFT_META_IIFNAME, "v1") + port(NFT_META_OIFNAME, "v2") + DROP
    expected = sized(652, BEGIN + TABLE_WITH_CHAINS + rule(276, 7, "fwd", exprs) + end(8))
    assert encoded([Drop(iif="v1", oif="v2")]) == expected


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
    """{a, b} | {c, d} as the supervisor builds it: one forward rule per direction per pair."""
    pairs = [("a", "c"), ("c", "a"), ("a", "d"), ("d", "a"),
             ("b", "c"), ("c", "b"), ("b", "d"), ("d", "b")]  # fmt: skip
    rules = b"".join(
        rule(276, 7 + i, "fwd", port(NFT_META_IIFNAME, x) + port(NFT_META_OIFNAME, y) + DROP)
        for i, (x, y) in enumerate(pairs)
    )
    expected = sized(2584, BEGIN + TABLE_WITH_CHAINS + rules + end(15))
    assert encoded([Drop(iif=x, oif=y) for x, y in pairs]) == expected


@pytest.mark.parametrize(("drop", "chains"), [
    (Drop(iif="x"), ["in", "fwd"]),
    (Drop(oif="x"), ["fwd", "out"]),
    (Drop(iif="x", oif="y"), ["fwd"]),
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
    batch = nftables.table_batch("envbox", [Drop(iif="v1", oif="v2")])  # 5 messages
    kernel.send(ack(1) + ack(2))  # several in one datagram
    for seq in (3, 4, 5, 6, 7):
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
