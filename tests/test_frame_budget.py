"""The budget for partly received frames, without sockets: every bound and the reserve."""

from __future__ import annotations

from dandelion_p2p.networks import network_of as network_prefix
from dandelion_p2p.wire.frame_budget import FrameBudget, FrameBudgetLimits

KiB = 1024


def test_network_prefixes_are_ipv4_slash_24_and_ipv6_slash_48() -> None:
    assert network_prefix("127.0.0.2") == network_prefix("127.0.0.200") == "127.0.0.0/24"
    assert network_prefix("127.0.1.5") == "127.0.1.0/24"
    assert network_prefix("2001:db8:1:2::7") == "2001:db8:1::/48"
    assert network_prefix("::ffff:10.1.2.3") == "10.1.2.0/24"
    assert network_prefix(None) == network_prefix("not an ip") == "unknown"


def test_each_bound_refuses_and_releasing_gives_the_bytes_back() -> None:
    limits = FrameBudgetLimits(total_bytes=800 * KiB, per_peer_bytes=100 * KiB,
                               per_network_bytes=200 * KiB, small_holder_bytes=10 * KiB)
    budget = FrameBudget(limits)
    assert budget.try_charge(b"a", "n1", 100 * KiB)
    assert not budget.try_charge(b"a", "n1", 1), "over the peer's share"
    assert budget.try_charge(b"b", "n1", 100 * KiB)
    assert not budget.try_charge(b"c", "n1", 1), "over the network's share"
    for i in range(5):
        assert budget.try_charge(bytes([i]), f"m{i}", 100 * KiB)
    # 700 KiB used: the last 100 KiB (an eighth) is kept for peers holding almost nothing.
    assert not budget.try_charge(b"big", "x", 20 * KiB)
    assert budget.try_charge(b"newcomer", "y", 4 * KiB)
    assert budget.refused == 3
    budget.release(b"a", "n1", 100 * KiB)
    assert budget.held_by(b"a") == 0 and budget.held_by_network("n1") == 100 * KiB
    assert budget.try_charge(b"c", "n1", 50 * KiB)
    assert budget.peak == 704 * KiB
