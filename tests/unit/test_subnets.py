"""Choosing each environment's subnet and naming its host link (supervisor/subnets.py), and the
guard's place in the hub's nf_tables batch: pure logic, no root.

The guard's expressions were checked once against the kernel (as root, in a throwaway namespace:
``nft list ruleset`` showed ``oifname "host" meta protocol arp accept``, ``oifname "host" meta
protocol ip @nh,128,32 0xc61200fe tcp flags != syn / syn,ack accept``, the four ``icmp type``
rules and ``oifname "host" drop``, in ``fwd`` and in ``out``); tests/integration/test_reachable.py
checks what they do.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from pytest_envbox.kernel import nftables
from pytest_envbox.kernel.netlink import Route
from pytest_envbox.supervisor import subnets

NET = ipaddress.IPv4Network


def test_the_pool_is_512_slash_24s_of_the_benchmarking_range() -> None:
    assert subnets.pool_subnet(0) == NET("198.18.0.0/24")
    assert subnets.pool_subnet(255) == NET("198.18.255.0/24")
    assert subnets.pool_subnet(256) == NET("198.19.0.0/24")
    assert subnets.pool_subnet(511) == NET("198.19.255.0/24")
    assert all(subnets.pool_index(subnets.pool_subnet(i)) == i for i in range(subnets.POOL_SIZE))
    assert subnets.pool_index(NET("198.18.0.0/25")) is None
    assert subnets.pool_index(NET("10.0.0.0/24")) is None


@pytest.mark.parametrize("net", ["198.18.0.0/24", "198.19.255.0/24", "10.99.0.0/28",
                                 "192.168.255.248/29", "172.16.0.0/12", "198.18.0.0/16"])  # fmt: skip
def test_a_host_link_name_fits_in_15_characters_and_is_the_same_for_the_same_subnet(net: str) -> None:
    name = subnets.link_name(NET(net))
    assert name.startswith("envbox") and len(name) <= 15
    assert name == subnets.link_name(NET(net))
    assert len({subnets.link_name(NET(n)) for n in ("10.99.0.0/28", "10.99.0.0/24", "10.99.0.16/28")}) == 3


def test_a_configured_pool_subnet_claims_the_pools_own_name() -> None:
    """So that a configured 198.18.3.0/24 and the pool's 4th /24 cannot both be routed."""
    assert subnets.link_name(NET("198.18.3.0/24")) == "envbox3"


def test_the_hosts_end_is_the_last_usable_address() -> None:
    assert subnets.host_end(NET("198.18.7.0/24")) == "198.18.7.254"
    assert subnets.host_end(NET("10.99.0.0/29")) == "10.99.0.6"


def test_a_route_or_address_of_the_hosts_in_a_subnet_keeps_it_unrouted() -> None:
    fake_ip = [Route("198.18.0.0/16", None, 254)]
    assert "a route" in (subnets.conflict(NET("198.18.5.0/24"), fake_ip) or "")
    assert subnets.conflict(NET("198.19.5.0/24"), fake_ip) is None
    address = [Route("198.18.9.1/32", None, 255)]
    assert "an address" in (subnets.conflict(NET("198.18.9.0/24"), address) or "")
    catch_alls = [Route("0.0.0.0/0", None, 254), Route("128.0.0.0/1", None, 254)]
    assert subnets.conflict(NET("198.18.9.0/24"), catch_alls) is None


@pytest.mark.parametrize("net", ["198.18.0.0/24", "198.19.255.0/24", "10.213.0.0/16", "198.18.0.0/16",
                                 "172.16.4.0/30", "198.18.3.0/25"])
def test_a_host_links_name_says_its_subnet(net: str) -> None:
    assert subnets.link_subnet(subnets.link_name(NET(net))) == NET(net)


def test_a_link_name_that_is_not_a_host_links_says_no_subnet() -> None:
    for name in ("eth0", "envbox", "envbox512", "envboxzz", "envbox0ad50000z", "envboxc0a80000w"):
        assert subnets.link_subnet(name) is None, name


def test_another_environments_link_keeps_an_overlapping_subnet_unrouted_while_it_is_down() -> None:
    """Down (an idle environment's), a link has no route: its name still says its subnet."""
    other = subnets.link_name(NET("10.213.0.0/16"))
    assert "another environment" in (subnets.conflict(NET("10.213.0.0/24"), [], [other, "lo"]) or "")
    assert subnets.conflict(NET("10.214.0.0/24"), [], [other]) is None
    # Its own name is not a conflict: the kernel tells who has it (EEXIST, see make_link).
    assert subnets.conflict(NET("10.213.0.0/16"), [], [other]) is None
    assert subnets.survey([], ["envbox0", subnets.link_name(NET("198.19.0.0/16"))])[:2] == (255, 1)


def test_the_survey_counts_free_and_held_slash_24s() -> None:
    free, held, why = subnets.survey([Route("198.18.0.0/16", None, 254)], ["lo", "envbox300"])
    assert (free, held) == (255, 1) and why is not None and "198.18.0.0/16" in why
    assert subnets.survey([], []) == (512, 0, None)


def _rules(batch: nftables.Batch) -> list[tuple[str, bytes]]:
    """(chain, message) of each NEWRULE of a batch, in order."""
    out = []
    for msg in batch.msgs:
        if struct.unpack_from("=H", msg, 4)[0] & 0xFF == nftables.NFT_MSG_NEWRULE:
            out.append(("fwd" if b"fwd\0" in msg else "out" if b"out\0" in msg else "in", msg))
    return out


def test_the_guard_follows_the_faults_in_the_forward_and_output_chains() -> None:
    guard = nftables.Guard("host", "198.18.0.254")
    alone = _rules(nftables.table_batch("envbox", [], guard))
    assert [c for c, _ in alone] == ["fwd", "out"] * len(guard.rules())
    with_drop = _rules(nftables.table_batch("envbox", [nftables.Drop(iif="v1")], guard))
    assert [c for c, _ in with_drop][:2] == ["in", "fwd"]  # the fault's rules first
    assert all(b"host\0" in m for _, m in with_drop[2:])
    assert len(guard.rules()) == 7  # arp, tcp, 4 icmp answers, then the drop
