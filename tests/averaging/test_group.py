from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dandelion_p2p.averaging.group import (
    Formation,
    GroupSpec,
    Member,
    bounded_weights,
    consensus_bans,
    form_groups,
    group_sizes,
    order_key,
)
from dandelion_p2p.averaging.messages import (
    MAX_LISTED_BANS,
    AveragingAnnouncement,
    decode_announcement,
    encode_announcement,
)
from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.runconfig.schema import DEFAULT_MAX_WEIGHT

RUN = b"run-a"
NOW = 1_700_000_000.0
LATER_MS = int((NOW + 600) * 1000)


def pid(i: int) -> bytes:
    return b"\x00\x24" + i.to_bytes(4, "big")


def announcement(
    weight: float = 10.0,
    bandwidth: float = 100.0,
    accepts: bool = True,
    *,
    run: bytes = RUN,
    round_: int = 7,
    expires_at_ms: int = LATER_MS,
) -> AveragingAnnouncement:
    return AveragingAnnouncement(
        run=run,
        round=round_,
        weight=weight,
        bandwidth_mbps=bandwidth,
        accepts_connections=accepts,
        endpoint="/ip4/10.0.0.1/tcp/4001",
        expires_at_ms=expires_at_ms,
    )


def spec(members: list[Member], **kw) -> GroupSpec:
    return GroupSpec.of(RUN, 7, members, **kw)


BASE = [Member(pid(1), 10.0, 100.0, True), Member(pid(2), 20.0, 50.0, False)]


# ----------------------------------------------------------------------- GroupSpec


def test_group_id_is_independent_of_member_order() -> None:
    assert spec(BASE).group_id == spec(list(reversed(BASE))).group_id
    assert len(spec(BASE).group_id) == 32


@pytest.mark.parametrize(
    "change",
    [
        lambda: GroupSpec.of(b"run-b", 7, BASE),
        lambda: GroupSpec.of(RUN, 8, BASE),
        lambda: spec([BASE[0]]),
        lambda: spec([*BASE, Member(pid(3), 1.0, 1.0)]),
        lambda: spec([dataclasses.replace(BASE[0], weight=10.5), BASE[1]]),
        lambda: spec([dataclasses.replace(BASE[0], bandwidth=99.0), BASE[1]]),
        lambda: spec([dataclasses.replace(BASE[0], accepts_connections=False), BASE[1]]),
        lambda: spec([dataclasses.replace(BASE[0], peer_id=pid(9)), BASE[1]]),
        lambda: spec(BASE, block_size=128),
        lambda: spec(BASE, min_bandwidth_fraction=0.5),
    ],
)
def test_any_difference_in_view_changes_the_group_id(change) -> None:
    assert change().group_id != spec(BASE).group_id


def test_leaving_members_out_folds_them_into_the_id_and_the_spans() -> None:
    formed = spec([*BASE, Member(pid(3), 5.0, 100.0), Member(pid(4), 5.0, 100.0)])
    narrowed = formed.without({pid(3), pid(9)})
    # Same formed group and same exclusions: same spec, whatever the order they were seen in.
    assert narrowed == formed.without([pid(9), pid(3)])
    assert narrowed.group_id == formed.without([pid(3)]).group_id
    assert narrowed.peer_ids == (pid(1), pid(2), pid(4)) and narrowed.excluded == (pid(3),)
    assert narrowed.member(pid(4)) == formed.member(pid(4))
    # Another exclusion set, or none, is another layout.
    ids = {formed.group_id, narrowed.group_id, formed.without({pid(4)}).group_id,
           formed.without({pid(3), pid(4)}).group_id}
    assert len(ids) == 4
    assert formed.without({pid(9)}) is formed
    part = narrowed.partition(10_000)
    assert pid(3) not in part.reducers and part.reducers == (pid(1), pid(4))
    with pytest.raises(ValueError):
        narrowed.without({pid(4)})


def test_the_members_left_are_seated_at_even_tables_in_round_order() -> None:
    formed = spec([Member(pid(i), 1.0, 100.0) for i in range(1, 41)])
    # 40 announced, 5 never answered: 35 left, seated at tables of 12, 12 and 11.
    kept = formed.without({pid(i) for i in range(1, 6)})
    tables = {kept.seat(m, 16).group_id: kept.seat(m, 16) for m in kept.peer_ids}
    assert sorted(len(t.members) for t in tables.values()) == [11, 12, 12]
    seated = [p for t in tables.values() for p in t.peer_ids]
    assert sorted(seated) == sorted(kept.peer_ids)
    for table in tables.values():
        # Every member at a table computes the same table, and its id names everyone else.
        assert all(kept.seat(p, 16) == table for p in table.peer_ids)
        assert set(table.excluded) == set(formed.peer_ids) - set(table.peer_ids)
        assert table.formed_id == formed.group_id
    # The round's order decides the tables: the next round seats other neighbours.
    later = GroupSpec.of(RUN, 8, formed.members).without({pid(i) for i in range(1, 6)})
    assert later.seat(pid(6), 16).peer_ids != kept.seat(pid(6), 16).peer_ids
    # Few enough left: one table, the spec itself.
    small = formed.without({pid(i) for i in range(1, 30)})
    assert small.seat(pid(35), 16) is small
    with pytest.raises(KeyError):
        kept.seat(pid(1), 16)


def test_spec_partition_uses_members_bandwidth_and_reachability() -> None:
    part = spec(BASE).partition(10_000)
    # Only the member accepting connections reduces.
    assert part.reducers == (pid(1),)
    assert part.span_of(pid(1)).size == 10_000
    assert spec(BASE).index_of(pid(2)) == 1 and pid(2) in spec(BASE)


@pytest.mark.parametrize(
    "build",
    [
        lambda: GroupSpec(RUN, 7, (BASE[1], BASE[0])),
        lambda: GroupSpec(RUN, 7, (BASE[0], BASE[0])),
        lambda: GroupSpec(RUN, 7, ()),
        lambda: GroupSpec(RUN, 7, tuple(BASE), block_size=0),
        lambda: Member(pid(1), 0.0, 1.0),
        lambda: Member(pid(1), float("nan"), 1.0),
        lambda: Member(pid(1), 1.0, float("inf")),
        lambda: Member(pid(1), 1.0, -1.0),
    ],
)
def test_invalid_specs_are_local_errors(build) -> None:
    with pytest.raises((ValueError, ProtocolViolation)):
        build()


def test_announcement_round_trips_and_validates() -> None:
    ann = announcement()
    assert decode_announcement(encode_announcement(ann)) == ann
    with pytest.raises(ProtocolViolation):
        announcement(weight=0.0)
    with pytest.raises(ProtocolViolation):
        announcement(bandwidth=-1.0)
    with pytest.raises(ProtocolViolation):
        announcement(run=b"")


# ----------------------------------------------------------------------- formation


@given(st.integers(0, 300), st.integers(1, 20), st.integers(0, 20))
def test_group_sizes_are_even_and_within_bounds(n: int, lo: int, extra: int) -> None:
    hi = lo + extra
    sizes = group_sizes(n, lo, hi)
    assert all(lo <= s <= hi for s in sizes)
    assert sizes == sorted(sizes, reverse=True)
    assert not sizes or sizes[0] - sizes[-1] <= 1
    left = n - sum(sizes)
    assert 0 <= left < lo or (left == 0)
    # As few groups as possible when everyone fits.
    if left == 0 and n:
        assert len(sizes) == -(-n // hi)
    # Nobody left out when some split keeps everyone within bounds.
    if any(k * lo <= n <= k * hi for k in range(1, n + 1)):
        assert left == 0


announcement_sets = st.dictionaries(
    st.integers(0, 10_000).map(pid),
    st.builds(
        announcement,
        weight=st.floats(0.5, 1e6),
        bandwidth=st.floats(0.0, 1e4),
        accepts=st.booleans(),
    ),
    max_size=60,
)


@settings(deadline=None, max_examples=150)
@given(announcement_sets, st.integers(1, 6), st.integers(0, 10), st.randoms())
def test_formation_is_deterministic_and_partitions_the_eligible(anns, lo, extra, rnd) -> None:
    hi = lo + extra
    banned = {p for p in anns if rnd.random() < 0.1}
    result = form_groups(anns, 7, lo, hi, banned, run=RUN, now=NOW)
    # The same inputs in another order give the same groups.
    items = list(anns.items())
    rnd.shuffle(items)
    again = form_groups(dict(items), 7, lo, hi, list(banned), run=RUN, now=NOW)
    assert again == result
    grouped = [p for g in result.groups for p in g.peer_ids]
    assert len(grouped) == len(set(grouped))
    eligible = set(anns) - banned
    assert set(grouped) | set(result.ungrouped) == eligible
    assert not set(grouped) & set(result.ungrouped)
    assert {p for p, _ in result.rejected} == banned
    assert all(lo <= len(g.members) <= hi for g in result.groups)
    assert len(result.ungrouped) < lo or not result.ungrouped
    sizes = [len(g.members) for g in result.groups]
    assert not sizes or max(sizes) - min(sizes) <= 1
    assert len({g.group_id for g in result.groups}) == len(result.groups)
    for g in result.groups:
        assert g.peer_ids == tuple(sorted(g.peer_ids))
        # Claims are bounded (bounded_weights, bounded_bandwidths), never raised.
        capped = bounded_weights({p: anns[p].weight for p in eligible}, DEFAULT_MAX_WEIGHT)
        for m in g.members:
            ann = anns[m.peer_id]
            assert (m.weight, m.accepts_connections) == (
                capped[m.peer_id],
                ann.accepts_connections,
            )
            assert m.bandwidth <= ann.bandwidth_mbps
        assert result.group_of(g.peer_ids[0]) is g


def test_invalid_announcements_are_rejected_with_reasons() -> None:
    anns = {
        pid(1): announcement(),
        pid(2): announcement(run=b"other"),
        pid(3): announcement(round_=6),
        pid(4): announcement(expires_at_ms=int(NOW * 1000)),
        pid(5): announcement(),
        b"\x01": announcement(),
    }
    result = form_groups(anns, 7, 2, 4, {pid(5)}, run=RUN, now=NOW)
    assert dict(result.rejected) == {
        pid(2): "another run",
        pid(3): "another round",
        pid(4): "expired",
        pid(5): "banned",
        b"\x01": "malformed peer id",
    }
    assert result.groups == () and result.ungrouped == (pid(1),)


def test_groups_reshuffle_between_rounds() -> None:
    anns = {pid(i): announcement(round_=0) for i in range(40)}
    by_round = []
    for r in range(3):
        round_anns = {p: dataclasses.replace(a, round=r) for p, a in anns.items()}
        f = form_groups(round_anns, r, 4, 8, run=RUN, now=NOW)
        assert [len(g.members) for g in f.groups] == [8] * 5
        by_round.append({frozenset(g.peer_ids) for g in f.groups})
    assert by_round[0] != by_round[1] != by_round[2]
    # The order is a hash: nobody is first in every round.
    firsts = {min(anns, key=lambda p: order_key(RUN, r, p)) for r in range(10)}
    assert len(firsts) > 1


def test_leftover_below_min_size_is_ungrouped() -> None:
    anns = {pid(i): announcement() for i in range(11)}
    f = form_groups(anns, 7, 4, 4, run=RUN, now=NOW)
    assert [len(g.members) for g in f.groups] == [4, 4]
    assert len(f.ungrouped) == 3
    ordered = sorted(anns, key=lambda p: order_key(RUN, 7, p))
    assert set(f.ungrouped) == set(ordered[8:])


def test_form_groups_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        form_groups({}, 7, 0, 4, run=RUN, now=NOW)
    with pytest.raises(ValueError):
        form_groups({}, 7, 5, 4, run=RUN, now=NOW)
    assert form_groups({}, 7, 2, 4, run=RUN, now=NOW) == Formation((), (), ())


def test_random_views_give_different_ids() -> None:
    rng = random.Random(3)
    anns = {pid(i): announcement(weight=rng.uniform(1, 9)) for i in range(6)}
    full = form_groups(anns, 7, 2, 8, run=RUN, now=NOW).groups[0]
    missing = dict(anns)
    missing.pop(pid(3))
    partial = form_groups(missing, 7, 2, 8, run=RUN, now=NOW).groups[0]
    assert full.group_id != partial.group_id


# ----------------------------------------------------------------------- bans


def test_a_ban_needs_more_than_half_of_the_other_announcers() -> None:
    def with_bans(*banned: int) -> AveragingAnnouncement:
        return dataclasses.replace(announcement(), banned=tuple(pid(b) for b in banned))

    # 5 announcers; peer 5 is accused by 3 of the 4 others, peer 1 by one only.
    anns = {
        pid(1): with_bans(5),
        pid(2): with_bans(5, 1),
        pid(3): with_bans(5),
        pid(4): with_bans(),
        pid(5): with_bans(1, 2, 3, 4),  # the accused accusing everyone back counts once each
    }
    assert consensus_bans(anns) == {pid(5)}
    # Half is not enough: 2 of the 4 others.
    anns[pid(3)] = with_bans()
    assert consensus_bans(anns) == frozenset()
    # Accusing oneself or a peer that did not announce changes nothing.
    assert consensus_bans({pid(1): with_bans(1, 9), pid(2): with_bans()}) == frozenset()
    # With two announcers, one accusation is a majority of the one other.
    assert consensus_bans({pid(1): with_bans(2), pid(2): with_bans()}) == {pid(2)}
    # Peer 3, banned by both others, is in no group.
    anns = {pid(i): with_bans(3) for i in (1, 2, 3)}
    formation = form_groups(anns, 7, 2, 8, consensus_bans(anns), run=RUN, now=NOW)
    assert {m.peer_id for g in formation.groups for m in g.members} == {pid(1), pid(2)}


def test_announcement_ban_lists_are_bounded() -> None:
    too_many = tuple(pid(i) for i in range(MAX_LISTED_BANS + 1))
    with pytest.raises(ProtocolViolation):
        dataclasses.replace(announcement(), banned=too_many)
    with pytest.raises(ProtocolViolation):
        dataclasses.replace(announcement(), banned=(b"",))
    listed = dataclasses.replace(announcement(), banned=(pid(3),))
    assert decode_announcement(encode_announcement(listed)) == listed
