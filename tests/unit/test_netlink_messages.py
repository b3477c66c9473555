"""Golden bytes for the rtnetlink requests ``netlink.py`` sends, and its reply parser; no root, no
netlink socket.

Each expected message is written out field by field from the kernel's UAPI structs, with the
constants copied here by hand (not imported from the module under test) and every length written
as a number worked out by hand:

    struct nlmsghdr  { __u32 nlmsg_len; __u16 nlmsg_type; __u16 nlmsg_flags; __u32 nlmsg_seq;
                       __u32 nlmsg_pid; }                                      <linux/netlink.h>
    struct nlattr    { __u16 nla_len; __u16 nla_type; }  payload padded to 4 (NLA_ALIGN)
    struct ifinfomsg { unsigned char ifi_family, __ifi_pad; unsigned short ifi_type;
                       int ifi_index; unsigned ifi_flags, ifi_change; }        <linux/rtnetlink.h>
    struct ifaddrmsg { __u8 ifa_family, ifa_prefixlen, ifa_flags, ifa_scope; __u32 ifa_index; }
    struct tcmsg     { unsigned char tcm_family, tcm__pad1; unsigned short tcm__pad2;
                       int tcm_ifindex; __u32 tcm_handle, tcm_parent, tcm_info; }
    struct tc_netem_qopt { __u32 latency, limit, loss, gap, duplicate, jitter; } <linux/pkt_sched.h>
    struct nlmsgerr  { int error; struct nlmsghdr msg; }

Cross-checked by hand once (not needed to run these tests):
- every constant and struct size/offset below: a C program compiled against Debian's
  linux-libc-dev 6.1 headers printed the same values;
- pyroute2 0.9.7's encoder (ifinfmsg, ifaddrmsg, tcmsg) gave the same bytes for getlink, set
  up/down, dellink, new/del address and clear qdisc; for the bridge and the veth it differs only in
  NLA_F_NESTED, which it does not set on IFLA_LINKINFO/IFLA_INFO_DATA; it has no
  TCA_NETEM_LATENCY64/JITTER64, and its netem header and tc_netem_qopt bytes were the same;
- iproute2 6.1 (``ip``, ``tc`` under strace, in a throwaway network namespace) sends the same
  bytes for ``ip link set dev X down``, ``ip link del``, ``ip addr del 10.1.2.3/24`` and
  ``tc qdisc del dev X root``. For ``ip link add ... type bridge`` / ``type veth peer name eth0
  netns FD`` it sends the same structure, with these differences: another attribute order,
  IFLA_INFO_KIND without its trailing NUL, and no NLA_F_NESTED. ``tc qdisc replace ... root
  handle 1: netem`` uses the same tcmsg and flags, but puts the delay in tc_netem_qopt (in ticks)
  instead of TCA_NETEM_LATENCY64/JITTER64 (in ns), which the kernel's netem_change prefers when
  present.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

import pytest

from pytest_envbox.kernel import netlink

# <linux/netlink.h>
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
# <linux/rtnetlink.h>
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWQDISC, RTM_DELQDISC = 36, 37
TCA_KIND, TCA_OPTIONS = 1, 2
# <linux/if_link.h>, <linux/veth.h>, <linux/if.h>
IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_NET_NS_FD = 3, 10, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFF_UP = 0x1
# <linux/if_addr.h>
IFA_ADDRESS, IFA_LOCAL = 1, 2
AF_INET = 2
# <linux/pkt_sched.h>
TCA_NETEM_LATENCY64, TCA_NETEM_JITTER64 = 10, 11
TC_H_ROOT = 0xFFFFFFFF
HANDLE_1_0 = 0x00010000  # TC_H_MAKE(1 << 16, 0), "1:"


def nlmsghdr(length: int, kind: int, flags: int, seq: int) -> bytes:
    return struct.pack("=IHHII", length, kind, flags, seq, 0)  # nlmsg_pid 0: to the kernel


def nla(length: int, kind: int) -> bytes:
    """An attribute header only: its payload (and padding) follow, written out by the caller."""
    return struct.pack("=HH", length, kind)


def ifinfomsg(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    # ifi_family AF_UNSPEC, __ifi_pad, ifi_type 0, ifi_index, ifi_flags, ifi_change: 16 bytes
    return struct.pack("=BBHiII", 0, 0, 0, index, flags, change)


def test_constants_match_the_kernel_headers() -> None:
    """The module's own constants, against the values copied above from the headers."""
    assert (netlink.RTM_NEWLINK, netlink.RTM_DELLINK, netlink.RTM_GETLINK) == (16, 17, 18)
    assert (netlink.RTM_NEWADDR, netlink.RTM_DELADDR) == (20, 21)
    assert (netlink.RTM_NEWQDISC, netlink.RTM_DELQDISC) == (36, 37)
    assert (netlink.IFLA_IFNAME, netlink.IFLA_MASTER, netlink.IFLA_LINKINFO) == (3, 10, 18)
    assert netlink.IFLA_NET_NS_FD == 28
    assert (netlink.TCA_NETEM_LATENCY64, netlink.TCA_NETEM_JITTER64) == (10, 11)


# --- golden requests -----------------------------------------------------------------------------


def test_getlink_by_name() -> None:
    expected = (
        nlmsghdr(40, RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, 1)  # 16 + 16 + 8
        + ifinfomsg()  # index 0: looked up by IFLA_IFNAME
        + nla(8, IFLA_IFNAME) + b"br0\0"
    )
    assert netlink.getlink_request("br0", seq=1) == expected
    assert expected.hex() == ("28000000120005000100000000000000"
                              "00000000000000000000000000000000" "08000300" "62723000")  # fmt: skip


def test_new_bridge() -> None:
    expected = (
        nlmsghdr(56, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, 2)
        + ifinfomsg()
        + nla(8, IFLA_IFNAME) + b"br0\0"
        + nla(16, IFLA_LINKINFO | NLA_F_NESTED)  # 4 + 12
        + nla(11, IFLA_INFO_KIND) + b"bridge\0" + b"\0"  # 4 + 7, padded to 12
    )
    assert netlink.new_bridge_request("br0", seq=2) == expected


def test_new_veth_pair_into_a_netns_fd_on_a_master() -> None:
    """``veth0`` here, enslaved to link 2 (IFLA_MASTER: "set master" at creation); its peer
    ``eth0`` made in the namespace of fd 5 (IFLA_NET_NS_FD, inside the peer's own ifinfomsg)."""
    peer = (
        nla(40, VETH_INFO_PEER)  # 4 + 16 + 12 + 8; not flagged nested: it starts with a struct
        + ifinfomsg()
        + nla(9, IFLA_IFNAME) + b"eth0\0" + b"\0\0\0"  # 4 + 5, padded to 12
        + nla(8, IFLA_NET_NS_FD) + struct.pack("=I", 5)
    )
    expected = (
        nlmsghdr(112, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, 3)
        + ifinfomsg()
        + nla(10, IFLA_IFNAME) + b"veth0\0" + b"\0\0"  # 4 + 6, padded to 12
        + nla(8, IFLA_MASTER) + struct.pack("=I", 2)
        + nla(60, IFLA_LINKINFO | NLA_F_NESTED)  # 4 + 12 + 44
        + nla(9, IFLA_INFO_KIND) + b"veth\0" + b"\0\0\0"
        + nla(44, IFLA_INFO_DATA | NLA_F_NESTED)  # 4 + 40
        + peer
    )
    assert netlink.new_veth_request("veth0", "eth0", 5, 2, seq=3) == expected


def test_new_veth_pair_without_master() -> None:
    expected = (
        nlmsghdr(100, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, 1)  # 16+16+8+60
        + ifinfomsg()
        + nla(7, IFLA_IFNAME) + b"v1\0" + b"\0"  # 4 + 3, padded to 8
        + nla(60, IFLA_LINKINFO | NLA_F_NESTED)
        + nla(9, IFLA_INFO_KIND) + b"veth\0" + b"\0\0\0"
        + nla(44, IFLA_INFO_DATA | NLA_F_NESTED)
        + nla(40, VETH_INFO_PEER) + ifinfomsg()
        + nla(9, IFLA_IFNAME) + b"eth0\0" + b"\0\0\0"
        + nla(8, IFLA_NET_NS_FD) + struct.pack("=I", 7)
    )
    assert netlink.new_veth_request("v1", "eth0", 7, seq=1) == expected


def test_link_up_and_down() -> None:
    """ifi_change = IFF_UP: only that flag changes, to ifi_flags' value of it."""
    up = nlmsghdr(32, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 4) + ifinfomsg(7, IFF_UP, IFF_UP)
    down = nlmsghdr(32, RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 5) + ifinfomsg(7, 0, IFF_UP)
    assert netlink.set_up_request(7, seq=4) == up
    assert netlink.set_up_request(7, True, seq=4) == up
    assert netlink.set_up_request(7, False, seq=5) == down
    # As iproute2's "ip link set dev X down" sends it (seq and index aside).
    assert down.hex() == "20000000100005000500000000000000" "00000000070000000000000001000000"


def _ifaddrmsg_10_1_2_3_24_on_4() -> bytes:
    return (
        struct.pack("=BBBBI", AF_INET, 24, 0, 0, 4)  # family, prefixlen, flags, scope universe, index
        + nla(8, IFA_LOCAL) + bytes([10, 1, 2, 3])  # network order
        + nla(8, IFA_ADDRESS) + bytes([10, 1, 2, 3])
    )


def test_add_ipv4_address() -> None:
    expected = (nlmsghdr(40, RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, 7)
                + _ifaddrmsg_10_1_2_3_24_on_4())  # fmt: skip
    assert netlink.new_address_request(4, "10.1.2.3", 24, seq=7) == expected


def test_delete_ipv4_address() -> None:
    expected = nlmsghdr(40, RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, 8) + _ifaddrmsg_10_1_2_3_24_on_4()
    assert netlink.del_address_request(4, "10.1.2.3", 24, seq=8) == expected


def _tcmsg(index: int, handle: int) -> bytes:
    # tcm_family AF_UNSPEC, 3 pad bytes, tcm_ifindex, tcm_handle, tcm_parent root, tcm_info
    return struct.pack("=BBHiIII", 0, 0, 0, index, handle, TC_H_ROOT, 0)


def test_netem_with_delay_and_jitter() -> None:
    expected = (
        nlmsghdr(100, RTM_NEWQDISC, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, 9)
        + _tcmsg(8, HANDLE_1_0)  # 20 bytes
        + nla(10, TCA_KIND) + b"netem\0" + b"\0\0"
        + nla(52, TCA_OPTIONS)  # 4 + 24 + 12 + 12: tc_netem_qopt, then netem's own attributes
        + struct.pack("=6I", 0, 10000, 0, 0, 0, 0)  # latency, limit, loss, gap, duplicate, jitter
        + nla(12, TCA_NETEM_LATENCY64) + struct.pack("=q", 12_500_000)  # ns
        + nla(12, TCA_NETEM_JITTER64) + struct.pack("=q", 3_250_000)
    )
    assert netlink.netem_request(8, 12.5, 3.25, seq=9) == expected


def test_netem_without_jitter_still_sends_a_zero_jitter() -> None:
    msg = netlink.netem_request(3, 1.0, seq=1)
    assert len(msg) == 100
    assert msg[-24:] == (nla(12, TCA_NETEM_LATENCY64) + struct.pack("=q", 1_000_000)
                         + nla(12, TCA_NETEM_JITTER64) + struct.pack("=q", 0))  # fmt: skip


def test_clear_qdisc() -> None:
    expected = nlmsghdr(36, RTM_DELQDISC, NLM_F_REQUEST | NLM_F_ACK, 10) + _tcmsg(8, 0)
    assert netlink.clear_qdisc_request(8, seq=10) == expected


# --- what is sent is what is built; the reply parser ---------------------------------------------


def error(seq: int, code: int) -> bytes:
    """NLMSG_ERROR as the kernel sends it: struct nlmsgerr, -errno (0: an ack), the request's
    header (a fake one will do: the parser reads only ``error``)."""
    return nlmsghdr(36, NLMSG_ERROR, 0, seq) + struct.pack("=i", -code) + nlmsghdr(16, 0, 0, seq)


@pytest.fixture
def pair() -> Iterator[tuple[netlink.Netlink, socket.socket]]:
    """A Netlink over one end of a datagram socketpair, and the other end playing the kernel."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    nl = netlink.Netlink(a)
    try:
        yield nl, b
    finally:
        nl.close()
        b.close()


def test_each_method_sends_exactly_its_builders_bytes(pair: tuple[netlink.Netlink, socket.socket]) -> None:
    nl, kernel = pair
    # The replies are queued ahead: every request is acked by sequence number, 1 to 9.
    for seq in range(1, 10):
        if seq == 2:  # index() needs an RTM_NEWLINK reply before its ack
            kernel.send(nlmsghdr(32, RTM_NEWLINK, 0, 2) + ifinfomsg(42) + error(2, 0))
        else:
            kernel.send(error(seq, 0))
    nl.add_bridge("br0")
    assert nl.index("br0") == 42
    nl.set_up(42)
    nl.add_veth("veth0", "eth0", 5, master=42)
    nl.set_up(43, False)
    nl.add_address(42, "10.1.2.3", 24)
    nl.del_address(42, "10.1.2.3", 24)
    nl.netem(43, 12.5, 3.25)
    nl.clear_qdisc(43)
    sent = [kernel.recv(65536) for _ in range(9)]
    assert sent == [
        netlink.new_bridge_request("br0", seq=1),
        netlink.getlink_request("br0", seq=2),
        netlink.set_up_request(42, True, seq=3),
        netlink.new_veth_request("veth0", "eth0", 5, 42, seq=4),
        netlink.set_up_request(43, False, seq=5),
        netlink.new_address_request(42, "10.1.2.3", 24, seq=6),
        netlink.del_address_request(42, "10.1.2.3", 24, seq=7),
        netlink.netem_request(43, 12.5, 3.25, seq=8),
        netlink.clear_qdisc_request(43, seq=9),
    ]


def test_a_kernel_error_raises_oserror_with_its_errno(pair: tuple[netlink.Netlink, socket.socket]) -> None:
    nl, kernel = pair
    kernel.send(error(1, errno.EEXIST))
    with pytest.raises(OSError) as e:
        nl.add_bridge("br0")
    assert e.value.errno == errno.EEXIST
    assert e.value.strerror == "create bridge br0: File exists"


def test_replies_to_other_requests_are_skipped(pair: tuple[netlink.Netlink, socket.socket]) -> None:
    """A stale error (another sequence number) in the same datagram is not this request's."""
    nl, kernel = pair
    nl.seq = 4
    kernel.send(error(4, errno.ENOENT) + error(5, 0))
    nl.set_up(1)  # seq 5: acked
    kernel.send(error(5, 0) + error(6, errno.EPERM))
    with pytest.raises(OSError) as e:
        nl.set_up(1, False)
    assert e.value.errno == errno.EPERM
    assert "set link 1 down" in str(e.value)


def test_messages_in_one_datagram_are_read_at_4_byte_alignment(
        pair: tuple[netlink.Netlink, socket.socket]) -> None:  # fmt: skip
    nl, kernel = pair
    reply = nlmsghdr(34, RTM_NEWLINK, 0, 1) + ifinfomsg(9) + b"xy"  # 34 bytes, next one at 36
    kernel.send(reply + b"\0\0" + error(1, 0))
    assert nl.index("eth0") == 9


def test_index_of_a_missing_link_is_enodev(pair: tuple[netlink.Netlink, socket.socket]) -> None:
    nl, kernel = pair
    kernel.send(nlmsghdr(16, NLMSG_DONE, 0, 1))  # no reply at all: NLMSG_DONE ends it too
    with pytest.raises(OSError) as e:
        nl.index("nope")
    assert e.value.errno == errno.ENODEV


def test_clear_qdisc_tolerates_none_to_remove_only(pair: tuple[netlink.Netlink, socket.socket]) -> None:
    nl, kernel = pair
    kernel.send(error(1, errno.ENOENT))
    kernel.send(error(2, errno.EINVAL))
    nl.clear_qdisc(3)
    nl.clear_qdisc(3)
    kernel.send(error(3, errno.EPERM))
    with pytest.raises(OSError) as e:
        nl.clear_qdisc(3)
    assert e.value.errno == errno.EPERM
