"""Attacks on group formation and aggregation by peers whose identities cost nothing.

Each test reproduces one attack and prints the figures it measured (run with ``-s``).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import trio
from libp2p.peer.id import ID

from dandelion_p2p.averaging.group import consensus_bans, form_groups
from dandelion_p2p.averaging.kept_channels import PURPOSE_KEPT, PURPOSE_ONE_ROUND
from dandelion_p2p.averaging.matchmaking import AVERAGING_NAMESPACE, round_key
from dandelion_p2p.averaging.messages import (
    AveragingAnnouncement,
    ChannelHello,
    encode_announcement,
    encode_hello,
)
from dandelion_p2p.averaging.report import RoundReport
from dandelion_p2p.dataplane.channel import Channel
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht.records import sign_record
from dandelion_p2p.runconfig.schema import DEFAULT_MAX_WEIGHT
from tests.averaging.test_averager import FAST, Member, averaging_swarm
from tests.averaging.test_averager import RUN as RUN_OF_SWARM
from tests.averaging.test_group import LATER_MS, NOW, RUN, pid


def announcement(
    weight: float = 2.0, bandwidth: float = 100.0, banned: tuple[bytes, ...] = ()
) -> AveragingAnnouncement:
    return AveragingAnnouncement(
        run=RUN,
        round=7,
        weight=weight,
        bandwidth_mbps=bandwidth,
        accepts_connections=True,
        endpoint="/ip4/10.0.0.1/tcp/4001",
        expires_at_ms=LATER_MS,
        banned=banned,
    )


def relative_l2(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("n_fresh", [4, 50])
def test_fresh_identities_banning_everyone_evict_nobody(n_fresh: int) -> None:
    honest = [pid(i) for i in range(1, 4)]
    seen = {p: announcement() for p in honest}
    for i in range(n_fresh):
        seen[pid(1000 + i)] = announcement(banned=tuple(honest))
    for me in honest:
        # Our own book: the other honest peers have averaged with us before.
        bans = consensus_bans(seen, track_recorded=set(honest) - {me}, me=me)
        formation = form_groups(seen, 7, 2, 64, bans, run=RUN, now=NOW)
        print(f"{n_fresh} fresh accusers, view of honest peer {honest.index(me)}: banned "
              f"{len(bans & set(honest))} honest peers, "
              f"honest grouped {sum(formation.group_of(p) is not None for p in honest)}/3")
        assert not bans & set(honest), f"{n_fresh} fresh keys evicted {len(bans)} honest peers"
        assert all(formation.group_of(p) is not None for p in honest)
    # Without any book every vote counts, yet a peer is still never evicted by others' votes.
    for me in honest:
        assert me not in consensus_bans(seen, None, me=me)


def test_a_ban_still_needs_a_majority_of_track_recorded_voters() -> None:
    peers = [pid(i) for i in range(1, 6)]
    target = peers[0]
    seen = {p: announcement(banned=(target,) if p in peers[1:4] else ()) for p in peers}
    bans = consensus_bans(seen, track_recorded=set(peers), me=peers[4])
    print(f"3 of 4 track-recorded voters accuse: banned={target in bans}")
    assert bans == {target}
    two_votes = {p: announcement(banned=(target,) if p in peers[1:3] else ()) for p in peers}
    assert consensus_bans(two_votes, track_recorded=set(peers), me=peers[4]) == frozenset()


def test_a_weight_claim_is_bounded_by_the_run_cap_and_the_median() -> None:
    seen = {pid(1): announcement(1.0), pid(2): announcement(2.0), pid(3): announcement(3.0)}
    seen[pid(9)] = announcement(1e9)
    formation = form_groups(seen, 7, 2, 16, run=RUN, now=NOW)
    (group,) = formation.groups
    weights = {m.peer_id: m.weight for m in group.members}
    share = weights[pid(9)] / sum(weights.values())
    print(f"liar claimed 1e9, holds weight {weights[pid(9)]} (share {share:.3f}); honest "
          f"weights {[weights[pid(i)] for i in (1, 2, 3)]}; overclaimed {formation.overclaimed}")
    assert weights[pid(9)] <= 2 * 2.5
    assert [weights[pid(i)] for i in (1, 2, 3)] == [1.0, 2.0, 3.0]
    assert formation.overclaimed == (pid(9),) and DEFAULT_MAX_WEIGHT < 1e9


def test_a_bandwidth_claim_takes_at_most_a_typical_members_span() -> None:
    seen = {pid(i): announcement(bandwidth=100.0) for i in (1, 2, 3)}
    seen[pid(9)] = announcement(bandwidth=1e9)
    (group,) = form_groups(seen, 7, 2, 16, run=RUN, now=NOW).groups
    part = group.partition(1_000_000)
    fraction = part.span_of(pid(9)).size / 1_000_000
    print(f"bandwidth liar (1e9 Mbit/s vs 100) reduces {fraction:.3f} of the vector")
    assert fraction <= 0.25 + 256 / 1_000_000


@pytest.mark.parametrize("mode", ["mean", "centered_clip"])
async def test_a_weight_liar_barely_moves_the_honest_result(mode: str) -> None:
    rng = np.random.default_rng(11)
    size = 100_000
    base = rng.standard_normal(size).astype(np.float32)
    honest_vectors = [base + 0.05 * rng.standard_normal(size).astype(np.float32) for _ in range(3)]
    honest_weights = [1.0, 2.0, 3.0]
    pairs = zip(honest_weights, honest_vectors, strict=True)
    want = sum(w * v.astype(np.float64) for w, v in pairs)
    want /= sum(honest_weights)
    # Honest peers differ by 5 % per element (centered clipping's tau follows that spread).
    # In mean mode any contribution moves the mean by its share, so the liar there sends a
    # vector close to the others' (the attack is the weight); centered clipping gets a poison.
    offset = 0.05 if mode == "mean" else 10.0
    poison = (want * (1 + offset)).astype(np.float32)
    vectors = [*honest_vectors, poison]
    weights = [*honest_weights, 1e9]
    settings = dataclasses.replace(FAST, mode=mode)
    async with averaging_swarm(4, settings) as members:
        buffers = [v.copy() for v in vectors]

        async def run(i: int) -> None:
            await members[i].averager.all_reduce(buffers[i], weights[i], 1)

        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(run, i)
        liar = members[3].node.identity.peer_id_bytes
        liar_scores = [m.node.scores.score(liar, 0.0) for m in members[:3]]
    errors = [relative_l2(buffers[i].astype(np.float64), want) for i in range(3)]
    unbounded = relative_l2(poison.astype(np.float64), want)
    print(f"{mode}: liar weight 1e9, poison at relative L2 {unbounded:.3f}; honest results at "
          f"{[round(e, 4) for e in errors]} from the honest weighted mean; liar scores "
          f"{liar_scores}")
    assert max(errors) < 0.05, f"{mode}: honest results at {errors}"


# ---------------------------------------------------------------- members that never deliver

HONEST_WEIGHTS = (1.0, 2.0, 3.0)
# The run defaults for table and group sizes: 50 fresh announcers are three times a table.
SILENT_SETTINGS = dataclasses.replace(
    FAST,
    chunk_timeout=2.0,
    matchmaking=dataclasses.replace(FAST.matchmaking, max_group=16, candidate_group=64),
)


def honest_inputs(size: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = [rng.standard_normal(size).astype(np.float32) for _ in HONEST_WEIGHTS]
    pairs = zip(HONEST_WEIGHTS, vectors, strict=True)
    want = sum(w * v.astype(np.float64) for w, v in pairs) / sum(HONEST_WEIGHTS)
    return vectors, want


async def honest_round(
    members: list[Member], buffers: list[np.ndarray], round_: int
) -> list[RoundReport]:
    reports: list[RoundReport | None] = [None] * len(members)

    async def run(i: int) -> None:
        reports[i] = await members[i].averager.all_reduce(buffers[i], HONEST_WEIGHTS[i], round_)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(len(members)):
                nursery.start_soon(run, i)
    return [r for r in reports if r is not None]


@pytest.mark.parametrize(("n_fresh", "finished"), [
    (4, False), (50, False), (50, True)])
async def test_fresh_announcers_that_never_connect_take_no_span(
    n_fresh: int, finished: bool
) -> None:
    """Fresh keys announce for the round (banning every honest peer, and in one case saying
    they finished it) and never connect.

    Their signed announcements go straight into each honest node's own record store: an
    attacker with many networks gets that many past the DHT's per-network caps, and the
    point here is what averaging does with the ones that arrive.
    """
    size = 200_000
    vectors, want = honest_inputs(size, n_fresh)
    # The three honest nodes share one process here, so their lookups of the fresh keys
    # share one event loop: the links get the default-sized time to settle.
    settings = dataclasses.replace(SILENT_SETTINGS, chunk_timeout=10.0)
    async with averaging_swarm(3, settings) as members:
        honest = [m.node.identity.peer_id_bytes for m in members]
        key = round_key(RUN_OF_SWARM, 1)
        expires_ms = int((time.time() + 60) * 1000)
        for i in range(n_fresh):
            fresh = Identity.generate()
            value = encode_announcement(AveragingAnnouncement(
                run=RUN_OF_SWARM, round=1, weight=2.0, bandwidth_mbps=1e9,
                accepts_connections=True, endpoint=f"10.9.{i // 250}.{i % 250}:4001",
                expires_at_ms=expires_ms, banned=tuple(honest), finished=finished,
            ))
            record = sign_record(fresh, AVERAGING_NAMESPACE, key, value, 1, expires_ms)
            for m in members:
                assert m.node.dht is not None
                m.node.dht.store.put(record, int(time.time() * 1000))
        buffers = [v.copy() for v in vectors]
        reports = await honest_round(members, buffers, 1)
    errors = [relative_l2(b.astype(np.float64), want) for b in buffers]
    for i, rep in enumerate(reports):
        print(f"{n_fresh} never-connecting fresh announcers (finished={finished}): honest "
              f"peer {i} averaged "
              f"{100 * rep.fraction_averaged:.1f} % of the vector with {len(rep.members)} "
              f"members, relative L2 to the honest mean {errors[i]:.2e}")
    assert len(reports) == 3
    for rep in reports:
        assert set(rep.members) == set(honest), "fresh announcers held spans"
        assert rep.fraction_averaged == 1.0 and rep.complete, rep.excluded
    assert max(errors) < 1e-5


async def test_a_member_that_never_answers_costs_one_round() -> None:
    """A liar announces a huge bandwidth, opens and accepts its channels, and never sends a
    chunk or a result. It costs its (median-bounded) span in the round it is met; every
    honest member saw it fail there, so all leave it out of the next round alike."""
    size = 200_000
    async with averaging_swarm(4, SILENT_SETTINGS) as everyone:
        members, liar = everyone[:3], everyone[3]
        liar_id = liar.node.identity.peer_id_bytes
        liar.averager.uninstall()

        async def hold_silently(channel: Channel) -> None:
            await trio.sleep_forever()

        liar.dataplane.register(PURPOSE_KEPT, hold_silently)
        liar.dataplane.register(PURPOSE_ONE_ROUND, hold_silently)
        opened: list[Channel] = []

        async def lie(round_: int) -> None:
            announcement = AveragingAnnouncement(
                run=RUN_OF_SWARM, round=round_, weight=2.0, bandwidth_mbps=1e9,
                accepts_connections=True, endpoint=liar.dataplane.endpoint or "",
                expires_at_ms=int((time.time() + 60) * 1000),
            )
            spec, _, _ = await liar.averager.matchmaker.match(liar_id, announcement)
            assert spec is not None
            for peer in spec.peer_ids:
                if liar_id < peer:
                    await liar.node.connect_peer(ID(peer))
                    channel = await liar.dataplane.open(ID(peer), PURPOSE_KEPT, timeout=10.0)
                    await channel.send(encode_hello(ChannelHello(RUN_OF_SWARM, round_,
                                                                 spec.group_id)))
                    opened.append(channel)

        fractions: list[list[float]] = []
        for round_ in (1, 2):
            vectors, want = honest_inputs(size, round_)
            buffers = [v.copy() for v in vectors]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lie, round_)
                reports = await honest_round(members, buffers, round_)
            fractions.append([rep.fraction_averaged for rep in reports])
            errors = [relative_l2(b.astype(np.float64), want) for b in buffers]
            for i, rep in enumerate(reports):
                print(f"round {round_}: honest peer {i} averaged "
                      f"{100 * rep.fraction_averaged:.1f} % with {len(rep.members)} members "
                      f"(liar a member: {liar_id in rep.members}); buffer at relative L2 "
                      f"{errors[i]:.3f} from the honest mean (what was not averaged stays "
                      "local)")
            assert len(reports) == 3
        for channel in opened:
            await channel.aclose()
    first, second = fractions
    assert all(0.7 <= f < 1.0 for f in first), f"round 1: {first}"
    assert all(f == 1.0 for f in second), f"round 2: {second}"
