"""The Kademlia routing table, without a network: buckets, the k limit, replacements, nearest."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from dandelion_p2p.net.dht.records import node_key
from dandelion_p2p.net.dht.routing import KEY_BITS, RoutingTable

LOCAL = b"local-peer"


def peer_ids(prefix: bytes = b"peer-") -> Iterator[bytes]:
    i = 0
    while True:
        yield prefix + str(i).encode()
        i += 1


def common_prefix_bits(a: bytes, b: bytes) -> int:
    bits_a = "".join(f"{x:08b}" for x in a)
    bits_b = "".join(f"{x:08b}" for x in b)
    n = 0
    while n < len(bits_a) and bits_a[n] == bits_b[n]:
        n += 1
    return n


def expected_bucket(local: bytes, peer: bytes) -> int:
    # Bucket i holds peers whose key first differs from ours at bit (KEY_BITS - 1 - i) counted
    # from the most significant end: the far half of the keyspace is bucket 255.
    return KEY_BITS - 1 - common_prefix_bits(node_key(local), node_key(peer))


def in_bucket(index: int, count: int, local: bytes = LOCAL) -> list[bytes]:
    found = []
    for pid in peer_ids():
        if expected_bucket(local, pid) == index:
            found.append(pid)
            if len(found) == count:
                return found
    raise AssertionError("unreachable")


def test_each_peer_lands_in_the_bucket_of_its_common_prefix_length() -> None:
    gen = peer_ids()
    for _ in range(40):
        pid = next(gen)
        table = RoutingTable(LOCAL)
        table.update(pid, (), now=0.0)
        # The only contact, never seen since t=0, makes exactly its own bucket stale.
        assert table.stale_buckets(now=10.0, max_age=1.0) == [expected_bucket(LOCAL, pid)]


def test_buckets_fill_to_k_and_keep_their_old_contacts() -> None:
    k = 3
    table = RoutingTable(LOCAL, k=k, replacements=2)
    far = in_bucket(KEY_BITS - 1, k + 2)
    near = in_bucket(KEY_BITS - 2, 1)
    for i, pid in enumerate(far[:k]):
        assert table.update(pid, (f"/ip4/10.0.0.{i}/tcp/1",), now=float(i))
    assert table.update(far[k], (), now=10.0) is False
    assert far[k] not in table
    # A full bucket does not stop other buckets from filling.
    assert table.update(near[0], (), now=10.0)
    assert len(table) == k + 1
    # A known contact is refreshed in place; its address is kept when none is given.
    assert table.update(far[0], (), now=20.0)
    contact = table.get(far[0])
    assert contact is not None
    assert contact.last_seen == 20.0
    assert contact.addrs == ("/ip4/10.0.0.0/tcp/1",)
    table.update(far[0], ("/ip4/10.0.0.9/tcp/2",), now=21.0)
    assert contact.addrs == ("/ip4/10.0.0.9/tcp/2",)


def test_removal_promotes_the_newest_replacement_until_none_is_left() -> None:
    k, spares = 2, 3
    table = RoutingTable(LOCAL, k=k, replacements=spares)
    ids = in_bucket(KEY_BITS - 1, k + spares + 1)
    members, waiting = ids[:k], ids[k:]
    for t, pid in enumerate(ids):
        table.update(pid, (), now=float(t))
    # The cache is bounded: the oldest newcomer was dropped.
    dropped, kept = waiting[0], waiting[1:]
    assert {c.peer_id for c in table.contacts()} == set(members)

    table.remove(members[0])
    assert kept[-1] in table, "the newest replacement takes the freed place"
    assert members[0] not in table
    table.remove(members[1])
    assert kept[-2] in table
    # Removing a waiting replacement drops it from the cache without touching the bucket.
    table.remove(kept[0])
    table.remove(kept[-1])
    assert {c.peer_id for c in table.contacts()} == {kept[-2]}
    table.remove(kept[-2])
    assert len(table) == 0
    assert dropped not in table
    # Forgetting an unknown peer is harmless.
    table.remove(b"never-seen")
    assert len(table) == 0


def test_self_is_never_added() -> None:
    table = RoutingTable(LOCAL, k=4)
    assert table.update(LOCAL, ("/ip4/127.0.0.1/tcp/1",), now=0.0) is False
    assert LOCAL not in table
    assert len(table) == 0
    for pid in in_bucket(KEY_BITS - 1, 3):
        table.update(pid, (), now=0.0)
    table.update(LOCAL, (), now=1.0)
    assert LOCAL not in {c.peer_id for c in table.nearest(node_key(LOCAL), 100)}
    assert len(table) == 3


@settings(max_examples=60, deadline=None, database=None)
@given(
    peers=st.lists(st.binary(min_size=2, max_size=40), min_size=0, max_size=80, unique=True),
    target=st.binary(min_size=32, max_size=32),
    count=st.integers(0, 90),
    k=st.sampled_from([1, 3, 20, 1000]),
)
def test_nearest_equals_a_brute_force_xor_sort(
    peers: list[bytes], target: bytes, count: int, k: int
) -> None:
    table = RoutingTable(LOCAL, k=k)
    for t, pid in enumerate(peers):
        table.update(pid, (), now=float(t))
    held = [c.peer_id for c in table.contacts()]
    assert LOCAL not in held
    if k >= len(peers):
        assert set(held) == set(peers) - {LOCAL}
    per_bucket = Counter(expected_bucket(LOCAL, h) for h in held)
    assert all(n <= k for n in per_bucket.values())

    goal = int.from_bytes(target, "big")
    brute = sorted(held, key=lambda pid: int.from_bytes(node_key(pid), "big") ^ goal)
    assert [c.peer_id for c in table.nearest(target, count)] == brute[:count]
    if held:
        excluded = held[0]
        expect = [pid for pid in brute if pid != excluded][:count]
        assert [c.peer_id for c in table.nearest(target, count, exclude=excluded)] == expect


def test_one_network_holds_a_sliver_of_a_bucket_and_of_the_table() -> None:
    """A Sybil farm mints ids for one bucket from one public /24: the bucket takes two of
    them and keeps its places for other networks; the whole table takes at most 16."""
    table = RoutingTable(LOCAL, k=20)
    farm = in_bucket(KEY_BITS - 1, 40)
    for t, pid in enumerate(farm):
        table.update(pid, ("/ip4/203.0.113.7/tcp/4001",), now=float(t), network="203.0.113.0/24")
    assert len(table) == 2
    honest = in_bucket(KEY_BITS - 1, 60)[40:]
    for t, pid in enumerate(honest[:10]):
        assert table.update(pid, (), now=100.0 + t, network=f"198.51.{t}.0/24")
    assert len(table) == 12
    # Peers of no public network (loopback, LAN) are not counted.
    lan = honest[10:18]
    for pid in lan:
        assert table.update(pid, ("/ip4/192.168.1.5/tcp/1",), now=200.0, network=None)
    assert table.networks()["203.0.113.0/24"] == 2
    # Across buckets, the table-wide bound holds.
    wide = RoutingTable(LOCAL, k=20)
    for index in range(KEY_BITS - 1, KEY_BITS - 13, -1):
        for pid in in_bucket(index, 3):
            wide.update(pid, (), now=0.0, network="203.0.113.0/24")
    assert wide.networks() == {"203.0.113.0/24": 16}
    assert len(wide) == 16


def test_a_freed_place_goes_to_a_replacement_whose_network_has_room() -> None:
    table = RoutingTable(LOCAL, k=3, replacements=4)
    ids = in_bucket(KEY_BITS - 1, 6)
    table.update(ids[0], (), now=0.0, network="203.0.113.0/24")
    table.update(ids[1], (), now=1.0, network="203.0.113.0/24")
    table.update(ids[2], (), now=2.0, network="198.51.100.0/24")
    # Bucket full: both wait; the farm's one is newest.
    table.update(ids[3], (), now=3.0, network="192.0.2.0/24")
    table.update(ids[4], (), now=4.0, network="203.0.113.0/24")
    table.remove(ids[2])
    # The farm's newcomer would be its third in the bucket: the other network's goes in.
    assert ids[3] in table and ids[4] not in table
    table.remove(ids[0])
    assert ids[4] in table
    assert table.networks() == {"203.0.113.0/24": 2, "192.0.2.0/24": 1}
