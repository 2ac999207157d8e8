"""The iterative lookup state machine, driven over a simulated network of a few hundred peers.

Every simulated peer has its own Kademlia routing table, filled from the full peer list in its
own random order (so far buckets hold an arbitrary k of the many peers that would fit), and
answers a query with the k nearest contacts it knows. Replies come back in random order, as
they would from real peers of different latency.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dandelion_p2p.net.dht.lookup import Lookup
from dandelion_p2p.net.dht.messages import PeerRef
from dandelion_p2p.net.dht.records import node_key
from dandelion_p2p.net.dht.routing import RoutingTable

PEERS = 300
K = 20

# Lookups are deterministic for a given network, target and failure set; derandomizing keeps
# the examples the same from run to run, so a failure here is never a fluke of the seed.
LOOKUPS = settings(max_examples=40, deadline=None, database=None, derandomize=True)


@dataclass
class Network:
    ids: list[bytes]
    tables: dict[bytes, RoutingTable]
    queries: list[bytes] = field(default_factory=list)

    def answer(self, peer_id: bytes, target: bytes) -> tuple[PeerRef, ...]:
        return tuple(c.ref() for c in self.tables[peer_id].nearest(target, K))


@functools.cache
def network() -> Network:
    rng = random.Random(2024)
    ids = [b"sim-%04d" % i for i in range(PEERS)]
    tables = {}
    for pid in ids:
        table = RoutingTable(pid, k=K)
        for t, other in enumerate(rng.sample(ids, len(ids))):
            table.update(other, (f"/ip4/10.1.{t // 250}.{t % 250}/tcp/4001",), now=float(t))
        tables[pid] = table
    return Network(ids, tables)


def true_closest(candidates: list[bytes], target: bytes, n: int) -> list[bytes]:
    goal = int.from_bytes(target, "big")
    return sorted(candidates, key=lambda p: int.from_bytes(node_key(p), "big") ^ goal)[:n]


@dataclass
class Trace:
    lookup: Lookup
    queried: list[bytes]
    max_in_flight: int


def drive(
    net: Network,
    start: bytes,
    target: bytes,
    *,
    width: int,
    alpha: int,
    dead: frozenset[bytes] = frozenset(),
    seed: int = 0,
) -> Trace:
    """Run a lookup to the end as the async adapter would, checking invariants at each step."""
    rng = random.Random(seed)
    seeds = [c.ref() for c in net.tables[start].nearest(target, max(width, K))]
    lookup = Lookup(target, seeds, local_peer_id=start, width=width, alpha=alpha)
    pending: list[bytes] = []
    queried: list[bytes] = []
    max_in_flight = 0
    # Each peer is asked at most once, so a lookup that has not ended after asking everybody
    # is looping.
    for _ in range(len(net.ids) + 1):
        for ref in lookup.next_queries():
            assert ref.peer_id != start, "a lookup never asks its own node"
            assert ref.peer_id not in queried, "a peer was asked twice"
            queried.append(ref.peer_id)
            pending.append(ref.peer_id)
        assert lookup.in_flight == len(pending)
        assert lookup.in_flight <= alpha
        max_in_flight = max(max_in_flight, lookup.in_flight)
        if lookup.finished or not pending:
            return Trace(lookup, queried, max_in_flight)
        peer = pending.pop(rng.randrange(len(pending)))
        if peer in dead:
            lookup.on_failure(peer)
        else:
            lookup.on_reply(peer, net.answer(peer, target))
    raise AssertionError("lookup did not terminate")


targets = st.binary(min_size=32, max_size=32)
starts = st.integers(0, PEERS - 1)


@LOOKUPS
@given(target=targets, start=starts, width=st.sampled_from([1, 4, 8, 20]), seed=st.integers())
def test_lookup_finds_the_true_closest_peers(
    target: bytes, start: int, width: int, seed: int
) -> None:
    net = network()
    me = net.ids[start]
    trace = drive(net, me, target, width=width, alpha=3, seed=seed)
    others = [p for p in net.ids if p != me]
    assert trace.lookup.finished
    assert [r.peer_id for r in trace.lookup.closest_answered()] == true_closest(
        others, target, width
    )
    # Far fewer peers are asked than exist: the lookup converges instead of flooding.
    assert len(trace.queried) < len(net.ids) // 3


@LOOKUPS
@given(
    target=targets,
    start=starts,
    failing=st.floats(0.05, 0.3),
    dead_seed=st.integers(),
    seed=st.integers(),
)
def test_lookup_routes_around_failing_peers(
    target: bytes, start: int, failing: float, dead_seed: int, seed: int
) -> None:
    net = network()
    me = net.ids[start]
    others = [p for p in net.ids if p != me]
    dead = frozenset(random.Random(dead_seed).sample(others, int(len(others) * failing)))
    width = 8
    trace = drive(net, me, target, width=width, alpha=3, dead=dead, seed=seed)
    alive = [p for p in others if p not in dead]
    found = [r.peer_id for r in trace.lookup.closest_answered()]
    assert trace.lookup.finished
    assert not dead & set(found)
    assert found == true_closest(alive, target, width)


@settings(max_examples=40, deadline=None, database=None)
@given(
    target=targets,
    start=starts,
    width=st.integers(1, 30),
    alpha=st.integers(1, 8),
    dead_seed=st.integers(),
    failing=st.floats(0.0, 1.0),
    seed=st.integers(),
)
def test_alpha_bound_and_termination_under_any_failures(
    target: bytes, start: int, width: int, alpha: int, dead_seed: int, failing: float, seed: int
) -> None:
    net = network()
    me = net.ids[start]
    others = [p for p in net.ids if p != me]
    dead = frozenset(random.Random(dead_seed).sample(others, int(len(others) * failing)))
    # ``drive`` asserts the bound after every step and fails if the lookup never ends.
    trace = drive(net, me, target, width=width, alpha=alpha, dead=dead, seed=seed)
    assert trace.max_in_flight <= alpha
    assert trace.lookup.in_flight == 0 or trace.lookup.finished
    assert trace.lookup.next_queries() == [] or trace.lookup.finished
    answered = [r.peer_id for r in trace.lookup.closest_answered()]
    assert len(answered) <= width
    assert not dead & set(answered)
    assert set(answered) <= set(trace.queried)


def ref(peer_id: bytes) -> PeerRef:
    return PeerRef(peer_id=peer_id)


def test_lookup_with_no_seeds_or_only_itself_is_finished_at_once() -> None:
    target = bytes(32)
    for seeds in ([], [ref(b"me")]):
        lookup = Lookup(target, seeds, local_peer_id=b"me", width=4, alpha=2)
        assert lookup.next_queries() == []
        assert lookup.finished
        assert lookup.closest_answered() == []


def test_lookup_ends_when_every_seed_fails() -> None:
    lookup = Lookup(
        bytes(32), [ref(b"a0"), ref(b"a1"), ref(b"a2")], local_peer_id=b"me", width=4, alpha=2
    )
    asked = lookup.next_queries()
    assert len(asked) == 2
    for r in asked:
        lookup.on_failure(r.peer_id)
    (last,) = lookup.next_queries()
    lookup.on_failure(last.peer_id)
    assert lookup.in_flight == 0
    assert lookup.next_queries() == []
    assert lookup.finished
    assert lookup.closest_answered() == []


def test_only_the_width_closest_are_asked_and_closer_news_takes_priority() -> None:
    target = bytes(32)
    pool = true_closest([b"p-%d" % i for i in range(40)], target, 40)
    near, far = pool[:2], pool[20:24]
    lookup = Lookup(target, [ref(p) for p in far], local_peer_id=b"me", width=2, alpha=1)
    (first,) = lookup.next_queries()
    assert first.peer_id == far[0]
    assert lookup.next_queries() == [], "alpha=1 allows one query in flight"
    # The reply names two much closer peers: the next query goes to them, not to far[1].
    lookup.on_reply(first.peer_id, [ref(p) for p in near])
    assert not lookup.finished
    (second,) = lookup.next_queries()
    assert second.peer_id == near[0]
    lookup.on_reply(second.peer_id, [])
    (third,) = lookup.next_queries()
    assert third.peer_id == near[1]
    lookup.on_reply(third.peer_id, [])
    assert lookup.finished
    assert [r.peer_id for r in lookup.closest_answered()] == near


def test_unsolicited_replies_and_addresses_are_merged_harmlessly() -> None:
    lookup = Lookup(bytes(32), [ref(b"a0")], local_peer_id=b"me", width=2, alpha=2)
    # A reply from a peer never asked only contributes its peers; it marks nothing answered.
    lookup.on_reply(
        b"stranger", [PeerRef(peer_id=b"a0", addrs=("/ip4/1.2.3.4/tcp/1",)), ref(b"me")]
    )
    lookup.on_failure(b"another-stranger")
    asked = lookup.next_queries()
    assert [r.peer_id for r in asked] == [b"a0"]
    assert asked[0].addrs == ("/ip4/1.2.3.4/tcp/1",), "a learned address fills in a bare ref"


@pytest.mark.parametrize("max_candidates", [8, 32])
def test_bounded_candidate_list_still_finds_the_closest(max_candidates: int) -> None:
    net = network()
    me = net.ids[0]
    target = node_key(b"somewhere")
    seeds = [c.ref() for c in net.tables[me].nearest(target, K)]
    lookup = Lookup(
        target, seeds, local_peer_id=me, width=4, alpha=2, max_candidates=max_candidates
    )
    for _ in range(PEERS):
        batch = lookup.next_queries()
        if lookup.finished or (not batch and lookup.in_flight == 0):
            break
        for r in batch:
            lookup.on_reply(r.peer_id, net.answer(r.peer_id, target))
    assert lookup.finished
    others = [p for p in net.ids if p != me]
    assert [r.peer_id for r in lookup.closest_answered()] == true_closest(others, target, 4)


def test_closest_settled_waits_for_the_closest_not_for_any_answers() -> None:
    target = bytes(32)
    pool = true_closest([b"q-%d" % i for i in range(30)], target, 30)
    near, far = pool[:3], pool[10:14]
    lookup = Lookup(target, [ref(p) for p in far], local_peer_id=b"me", width=8, alpha=4)
    for r in lookup.next_queries():
        lookup.on_reply(r.peer_id, [])
    # Four far peers answered (each might hold a stale copy): that settles nothing while
    # closer peers are known and unasked.
    assert lookup.closest_settled(3) == far[:3]
    lookup.add([ref(p) for p in near])
    assert lookup.closest_settled(3) is None
    asked = lookup.next_queries()
    assert [r.peer_id for r in asked][:3] == near
    lookup.on_reply(near[0], [])
    lookup.on_failure(near[1])
    assert lookup.closest_settled(3) is None, "near[2] has not answered yet"
    lookup.on_reply(near[2], [])
    # A failed peer is skipped: the closest three that did not fail.
    assert lookup.closest_settled(3) == [near[0], near[2], far[0]]
