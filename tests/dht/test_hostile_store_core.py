"""The record store's quotas and reply selection against many identities, without sockets.

Fresh identities are free, so these tests give an attacker as many as it wants and check that
what it gets is bounded by the networks it stores from.
"""

from __future__ import annotations

import random

import pytest

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht.messages import SignedRecord
from dandelion_p2p.net.dht.records import (
    LocalRecordStore,
    Source,
    StoreLimits,
    diverse_selection,
    routing_key,
    sign_record,
    stored_size,
)
from dandelion_p2p.networks import network_of
from dandelion_p2p.wire import RejectCode

NOW = 1_700_000_000_000
NAMESPACE = "members"
KEY = b"swarm"
# Signing is the slow part: a pool of identities, reused as publishers under different keys.
POOL = [Identity.from_seed(i.to_bytes(32, "big")) for i in range(1, 161)]


def record(who: Identity, *, key: bytes = KEY, value: bytes = b"v", expires: int = 600_000,
           seq: int = 1) -> SignedRecord:
    return sign_record(who, NAMESPACE, key, value, seq, NOW + expires)


def from_network(network: str, index: int) -> Source:
    return Source(peer=b"peer-%d-" % index + network.encode(), network=network)


def try_put(store: LocalRecordStore, rec: SignedRecord, source: Source) -> bool:
    try:
        return store.put(rec, NOW, source)
    except ProtocolViolation as exc:
        assert exc.code is RejectCode.RATE_LIMITED
        return False


@pytest.mark.parametrize(
    "address, network",
    [
        ("203.0.113.77", "203.0.113.0/24"),
        ("127.0.0.2", "127.0.0.0/24"),
        ("127.0.1.5", "127.0.1.0/24"),
        ("2001:db8:1234:5678::1", "2001:db8:1234::/48"),
        ("::ffff:198.51.100.9", "198.51.100.0/24"),
        ("not an address", "unknown"),
        (None, "unknown"),
    ],
)
def test_network_of_is_the_v4_24_or_v6_48(address: str | None, network: str) -> None:
    assert network_of(address) == network


def test_one_network_of_many_peers_cannot_take_a_keys_slots() -> None:
    limits = StoreLimits(max_publishers_per_key=128)
    store = LocalRecordStore(limits)
    hostile = "198.51.100.0/24"
    taken = sum(try_put(store, record(POOL[i]), from_network(hostile, i)) for i in range(150))
    newcomer = try_put(store, record(POOL[150]), from_network("203.0.113.0/24", 0))
    print(f"150 peers of one network offered 150 publishers: {taken} slots taken of "
          f"{limits.max_publishers_per_key}; newcomer from another network stored: {newcomer}")
    assert taken == limits.per_network_publishers_per_key
    assert newcomer


def test_a_full_key_makes_room_from_the_network_holding_the_most() -> None:
    limits = StoreLimits(max_publishers_per_key=8, per_network_publishers_per_key=8)
    store = LocalRecordStore(limits)
    for i in range(8):
        assert try_put(store, record(POOL[i]), from_network("198.51.100.0/24", i))
    # Full: a newcomer from another network displaces the oldest of the biggest network ...
    assert try_put(store, record(POOL[8]), from_network("203.0.113.0/24", 0))
    held = {r.publisher for r in store.get(routing_key(NAMESPACE, KEY), NOW)}
    assert POOL[8].peer_id_bytes in held and POOL[0].peer_id_bytes not in held
    assert len(held) == 8
    # ... but the biggest network cannot displace anyone to grow further.
    assert not try_put(store, record(POOL[9]), from_network("198.51.100.0/24", 9))


def test_total_bytes_stay_under_the_cap_and_a_small_network_still_stores() -> None:
    value = b"x" * 4096
    cap = 40 * stored_size(record(POOL[0], value=value))
    limits = StoreLimits(max_bytes=cap, per_network_bytes=cap)
    store = LocalRecordStore(limits)
    offered = 0
    for n in range(4):
        network = f"198.51.{n}.0/24"
        for i in range(40):
            offered += 1
            try_put(store, record(POOL[i], key=b"k%d-%d" % (n, i), value=value),
                    from_network(network, i % 8))
    honest = try_put(store, record(POOL[0], key=b"mine", value=value),
                     from_network("203.0.113.0/24", 0))
    print(f"{offered} records of 4 KiB from 4 networks: store holds {store.total_bytes} "
          f"bytes, cap {cap}; a fifth network's record stored: {honest}")
    assert store.total_bytes <= cap
    assert honest


def test_per_peer_and_per_network_quotas_count_replacements_once() -> None:
    limits = StoreLimits(per_peer_records=3)
    store = LocalRecordStore(limits)
    source = from_network("198.51.100.0/24", 0)
    for seq in range(1, 10):
        assert try_put(store, record(POOL[0], seq=seq), source)
    assert store.usage_of_peer(source.peer)[0] == 1
    assert try_put(store, record(POOL[1]), source)
    assert try_put(store, record(POOL[2]), source)
    assert not try_put(store, record(POOL[3]), source)
    assert store.usage_of_network(source.network)[0] == 3
    store.purge(NOW + 600_000)
    assert store.total_bytes == 0 and store.usage_of_network(source.network) == (0, 0)


def test_replies_take_turns_between_networks_and_ignore_expiry_claims() -> None:
    store = LocalRecordStore(StoreLimits(per_network_publishers_per_key=2000,
                                         per_peer_publishers_per_key=2000,
                                         max_publishers_per_key=2000, per_peer_records=2000))
    hostile = from_network("198.51.100.0/24", 0)
    for i in range(1000):
        # Publishers reused under one key would replace each other: vary the signer's seed.
        who = POOL[i % 150] if i < 150 else Identity.from_seed((1000 + i).to_bytes(32, "big"))
        store.put(record(who, expires=3_600_000), NOW, hostile)
    honest = [Identity.from_seed((5000 + i).to_bytes(32, "big")) for i in range(3)]
    for i, who in enumerate(honest):
        store.put(record(who, expires=60_000), NOW - 30_000, from_network(f"203.0.{i}.0/24", i))
    entries = store.entries(routing_key(NAMESPACE, KEY), NOW)
    chosen = diverse_selection(entries, budget=1 << 20, max_count=16,
                               size_of=lambda r: 200, rng=random.Random(1))
    seen = {r.publisher for r in chosen}
    honest_ids = {h.peer_id_bytes for h in honest}
    print(f"{len(entries)} records under one key ({len(entries) - 3} hostile with the longest "
          f"expiry): a reply of {len(chosen)} carries {len(seen & honest_ids)} of 3 honest")
    assert honest_ids <= seen
