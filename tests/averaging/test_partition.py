from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dandelion_p2p.averaging.partition import (
    Chunk,
    Fallback,
    PeerBandwidth,
    partition,
    split_chunks,
)

peer_lists = st.lists(
    st.builds(
        PeerBandwidth,
        peer_id=st.binary(min_size=1, max_size=6),
        bandwidth=st.one_of(
            st.just(0.0),
            st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False),
            st.sampled_from([1e6, 1e7, 1.25e7, 1e8]),
        ),
        accepts_connections=st.booleans(),
    ),
    min_size=1,
    max_size=12,
    unique_by=lambda p: p.peer_id,
)
sizes = st.integers(min_value=0, max_value=10**8)
blocks = st.sampled_from([1, 7, 256, 1024])
fractions = st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0])


def expected_weights(peers: list[PeerBandwidth], fraction: float) -> dict[bytes, Fraction]:
    candidates = [p for p in peers if p.accepts_connections] or peers
    best = max(p.bandwidth for p in candidates)
    if best == 0:
        return {p.peer_id: Fraction(1) for p in candidates}
    return {
        p.peer_id: Fraction(p.bandwidth)
        for p in candidates
        if Fraction(p.bandwidth) >= Fraction(fraction) * Fraction(best)
    }


@settings(deadline=None)
@given(peer_lists, sizes, blocks, fractions)
def test_spans_cover_exactly_in_peer_order(peers, n, block, fraction):
    part = partition(n, peers, block_size=block, min_bandwidth_fraction=fraction)
    assert [s.peer_id for s in part.spans] == sorted(p.peer_id for p in peers)
    assert part.spans[0].start == 0
    assert part.spans[-1].end == n
    for prev, cur in zip(part.spans, part.spans[1:], strict=False):
        assert prev.end == cur.start
    assert all(s.size >= 0 for s in part.spans)
    assert sum(s.size for s in part.spans) == n


@settings(deadline=None)
@given(peer_lists, sizes, blocks, fractions)
def test_spans_are_block_aligned_except_at_the_end(peers, n, block, fraction):
    part = partition(n, peers, block_size=block, min_bandwidth_fraction=fraction)
    for s in part.spans:
        if s.size:
            assert s.start % block == 0
            assert s.end % block == 0 or s.end == n


@settings(deadline=None)
@given(peer_lists, sizes, blocks, fractions)
def test_excluded_peers_reduce_nothing_and_sizes_are_proportional(peers, n, block, fraction):
    part = partition(n, peers, block_size=block, min_bandwidth_fraction=fraction)
    weights = expected_weights(peers, fraction)
    total = sum(weights.values())
    for s in part.spans:
        w = weights.get(s.peer_id, Fraction(0))
        if w == 0:
            assert s.size == 0
        assert abs(Fraction(s.size) - Fraction(n) * w / total) <= block


@settings(deadline=None)
@given(peer_lists, sizes, blocks, st.randoms(use_true_random=False))
def test_any_input_order_gives_the_same_partition(peers, n, block, rnd):
    shuffled = list(peers)
    rnd.shuffle(shuffled)
    assert partition(n, peers, block_size=block) == partition(n, shuffled, block_size=block)


@settings(deadline=None)
@given(peer_lists, sizes, blocks)
def test_fallback_is_reported_only_when_needed(peers, n, block):
    part = partition(n, peers, block_size=block)
    direct = [p for p in peers if p.accepts_connections]
    assert (Fallback.RELAYED in part.fallback) == (not direct)
    candidates = direct or peers
    assert (Fallback.EQUAL in part.fallback) == all(p.bandwidth == 0 for p in candidates)
    if n >= block * len(peers):
        assert part.reducers, "someone must reduce a vector this large"


def test_bandwidth_proportional_example():
    peers = [
        PeerBandwidth(b"c", 1e8),
        PeerBandwidth(b"a", 3e8),
        PeerBandwidth(b"b", 1e6),  # below 10 % of the best
        PeerBandwidth(b"d", 5e8, accepts_connections=False),
    ]
    part = partition(1024 * 1000, peers, block_size=1024)
    assert part.fallback == Fallback.NONE
    assert [(s.peer_id, s.size) for s in part.spans] == [
        (b"a", 750 * 1024),
        (b"b", 0),
        (b"c", 250 * 1024),
        (b"d", 0),
    ]
    assert part.reducers == (b"a", b"c")
    assert part.span_of(b"c").start == 750 * 1024


def test_last_span_ends_off_block():
    part = partition(1000, [PeerBandwidth(b"a", 1.0), PeerBandwidth(b"b", 1.0)], block_size=256)
    assert [(s.start, s.end) for s in part.spans] == [(0, 512), (512, 1000)]


def test_all_natted_peers_reduce_through_relays():
    peers = [PeerBandwidth(bytes([i]), 1e7, accepts_connections=False) for i in range(4)]
    part = partition(4096, peers, block_size=256)
    assert part.fallback == Fallback.RELAYED
    assert [s.size for s in part.spans] == [1024] * 4
    assert "relay" in part.fallback.describe()


def test_zero_bandwidth_everywhere_splits_equally_among_direct_peers():
    peers = [
        PeerBandwidth(b"a", 0.0),
        PeerBandwidth(b"b", 0.0, accepts_connections=False),
        PeerBandwidth(b"c", 0.0),
    ]
    part = partition(2048, peers, block_size=256)
    assert part.fallback == Fallback.EQUAL
    assert [s.size for s in part.spans] == [1024, 0, 1024]


def test_tiny_vector_goes_to_few_reducers():
    peers = [PeerBandwidth(bytes([i]), 1.0) for i in range(8)]
    part = partition(300, peers, block_size=256)
    assert sum(1 for s in part.spans if s.size) <= 2
    assert sum(s.size for s in part.spans) == 300


@pytest.mark.parametrize(
    ("n", "peers", "kwargs"),
    [
        (-1, [PeerBandwidth(b"a", 1.0)], {}),
        (10, [], {}),
        (10, [PeerBandwidth(b"a", 1.0), PeerBandwidth(b"a", 2.0)], {}),
        (10, [PeerBandwidth(b"a", math.nan)], {}),
        (10, [PeerBandwidth(b"a", -1.0)], {}),
        (10, [PeerBandwidth(b"a", math.inf)], {}),
        (10, [PeerBandwidth(b"a", 1.0)], {"block_size": 0}),
        (10, [PeerBandwidth(b"a", 1.0)], {"min_bandwidth_fraction": 1.5}),
    ],
)
def test_invalid_input_is_refused(n, peers, kwargs):
    with pytest.raises(ValueError):
        partition(n, peers, **kwargs)


@settings(deadline=None)
@given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.integers(1, 5000),
    st.sampled_from([1, 256]),
)
def test_chunks_cover_span_and_respect_limits(start, length, max_chunk, block):
    start -= start % block
    end = start + min(length, 1000 * max_chunk)
    if max_chunk < block:
        with pytest.raises(ValueError):
            split_chunks(start, end, max_chunk, block)
        return
    chunks = split_chunks(start, end, max_chunk, block)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    pos = start
    for c in chunks:
        assert c.start == pos
        assert 0 < c.size <= max_chunk
        assert c.start % block == 0
        pos = c.end
    assert pos == end
    assert all(c.size == chunks[0].size for c in chunks[:-1])


def test_partition_chunks_of_a_span():
    part = partition(1000, [PeerBandwidth(b"a", 1.0), PeerBandwidth(b"b", 1.0)], block_size=256)
    assert part.chunks(b"b", 300) == (Chunk(0, 512, 768), Chunk(1, 768, 1000))
    assert part.chunks(b"a", 10_000) == (Chunk(0, 0, 512),)
    with pytest.raises(KeyError):
        part.span_of(b"zz")


def test_many_peers_is_fast_enough():
    rnd = random.Random(1)
    peers = [PeerBandwidth(rnd.randbytes(34), rnd.uniform(1e6, 1e9)) for _ in range(500)]
    part = partition(2_567_463_684, peers)
    assert sum(s.size for s in part.spans) == 2_567_463_684
