"""Equivocation proofs travel through the DHT: a peer that never took part in the round reads
a member's proof and bans the reducer; a forged proof is refused by every DHT server, which
scores whoever tried to store it, and frames no one."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import trio

from dandelion_p2p.averaging import averager as averager_module
from dandelion_p2p.averaging.averager import AveragingSettings, NoGroup
from dandelion_p2p.averaging.equivocation import EquivocationProof, make_proof
from dandelion_p2p.averaging.matchmaking import MatchmakingSettings
from dandelion_p2p.averaging.messages import AveragingAnnouncement
from dandelion_p2p.averaging.proofs import (
    MAX_PROOFS_CHECKED_PER_FETCH,
    PROOF_NAMESPACE,
    PROOF_TTL_S,
    ProofExchange,
    SeenProofs,
    check_proof_value,
    proof_to_publish,
)
from dandelion_p2p.averaging.report import RoundReport
from dandelion_p2p.errors import ProtocolViolation, RemoteRejected
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht.messages import MAX_VALUE, PutRecord
from dandelion_p2p.net.dht.node import DHT, MAX_FRAME, PROTOCOL_ID, now_ms
from dandelion_p2p.net.dht.records import sign_record
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.net.streams import request
from dandelion_p2p.reputation.book import ScoreEvent
from dandelion_p2p.wire import RejectCode, encode
from tests.averaging.test_averager import averaging_swarm
from tests.averaging.test_hostile_equivocation import (
    FORGER,
    REDUCER,
    SHIFTED_VALUES,
    TRUE_VALUES,
    result,
)
from tests.swarm import swarm

RUN = b"run"  # the run the headers of ``result`` name


def _now() -> float:
    return time.time()


def genuine_proof() -> bytes:
    return encode(make_proof(result(TRUE_VALUES), result(SHIFTED_VALUES)))


def framing_proof() -> bytes:
    """What a forger can make against an honest reducer: its own signature on the second."""
    return encode(make_proof(result(TRUE_VALUES), result(SHIFTED_VALUES, signer=FORGER)))


async def put_directly(sender: SwarmNode, server: SwarmNode, value: bytes) -> RejectCode | None:
    """Store a record signed by ``sender`` on ``server`` alone, bypassing ``sender``'s own
    checks; the reject code, or None when stored."""
    record = sign_record(
        sender.identity, PROOF_NAMESPACE, RUN, value, now_ms(), now_ms() + 600_000
    )
    try:
        await request(
            sender.host, server.host.get_id(), PROTOCOL_ID, PutRecord(record=record), DHT,
            max_reply=MAX_FRAME, timeout=10.0,
        )
    except RemoteRejected as exc:
        return RejectCode(exc.code)
    return None


async def test_a_peer_outside_the_round_bans_the_reducer_on_a_proof_from_the_dht() -> None:
    async with swarm(4) as nodes:
        member, _, _, outsider = nodes
        stored = await ProofExchange(member.records, member, RUN).publish(
            [genuine_proof()], [member.identity.peer_id_bytes], member.identity.peer_id_bytes
        )
        assert stored >= 1, "no DHT server stored the proof"
        exchange = ProofExchange(outsider.records, outsider, RUN)
        banned = await exchange.fetch(force=True)
        reducer = REDUCER.peer_id_bytes
        assert banned == [reducer] and outsider.scores.is_banned(reducer, _now()), banned
        score = outsider.scores.score(reducer, _now())
        # Read again: the same proof bans once, it is not applied at every fetch.
        again = await exchange.fetch(force=True)
        assert again == [] and outsider.scores.standing(reducer, _now()).events == {
            ScoreEvent.EQUIVOCATION.value: 1
        }
        print(
            f"\nproof of {len(genuine_proof())} B (record limit {MAX_VALUE} B, TTL "
            f"{PROOF_TTL_S:.0f} s) stored on {stored} DHT servers; the outsider read it and "
            f"banned the reducer at score {score:.1f}; a second read applied nothing"
        )


async def test_a_forged_proof_is_refused_by_the_dht_and_scores_its_publisher() -> None:
    async with swarm(3) as nodes:
        server, outsider, forger = nodes
        forged = framing_proof()
        code = await put_directly(forger, server, forged)
        forger_score = server.scores.score(forger.identity.peer_id_bytes, _now())
        assert code is RejectCode.BAD_SIGNATURE and forger_score < 0, (code, forger_score)
        junk_code = await put_directly(forger, outsider, b"\x00" * 40)
        assert junk_code is not None, "a value that is no proof was stored"
        # Published the ordinary way, the forged record reaches the other servers, which
        # refuse it; at most the forger's own store keeps it, and readers refuse it from there.
        stored = await forger.records.put(PROOF_NAMESPACE, RUN, forged, 600.0, keep=False)
        assert stored <= 1, f"{stored} servers stored a forged proof"
        banned = await ProofExchange(outsider.records, outsider, RUN).fetch(force=True)
        reducer = REDUCER.peer_id_bytes
        assert banned == [] and not outsider.scores.is_banned(reducer, _now()), banned
        assert not server.scores.is_banned(reducer, _now())
        print(
            f"\nforged proof refused with {code.name} (forger scored {forger_score:.1f} by the "
            f"server), junk value refused with {junk_code.name}, {stored} servers (the forger's "
            f"own at most) kept its ordinary put; the honest reducer's score "
            f"on the outsider: {outsider.scores.score(reducer, _now()):.1f}"
        )


async def test_the_averager_applies_published_proofs_before_it_forms_a_group() -> None:
    settings = AveragingSettings(
        matchmaking=MatchmakingSettings(gather_window=0.3, settle=0.2, min_group=2)
    )
    async with averaging_swarm(3, settings) as members:
        reporter, _, outsider = members
        me = reporter.node.identity.peer_id_bytes
        assert await reporter.averager.proofs.publish([genuine_proof()], [me], me) >= 1
        # Alone in this round of its own run the outsider finds no group, but it read the
        # proofs first: the reducer is banned before any formation.
        with pytest.raises(NoGroup):
            await outsider.averager.all_reduce(np.zeros(1024, np.float32), 1.0, round_=1)
        reducer = REDUCER.peer_id_bytes
        assert outsider.node.scores.is_banned(reducer, _now())
        assert outsider.averager._banned_now() == [reducer]
        print(
            f"\naverager of a peer outside the round banned "
            f"{len(outsider.averager._banned_now())} reducer from the DHT before forming its group"
        )


async def test_after_its_first_round_an_averager_reads_the_proofs_in_the_background(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round after the first waits for no read of the proofs: the averager reads them every
    ``fetch_interval`` while it is installed, and stops when it is uninstalled."""
    monkeypatch.setattr(averager_module, "MIN_PROOF_READ_GAP", 0.05)
    settings = AveragingSettings(
        matchmaking=MatchmakingSettings(gather_window=0.3, settle=0.2, min_group=2)
    )
    async with averaging_swarm(3, settings) as members:
        reporter, _, outsider = members
        outsider.averager.proofs.fetch_interval = 0.3
        with pytest.raises(NoGroup):
            await outsider.averager.all_reduce(np.zeros(1024, np.float32), 1.0, round_=1)
        reducer = REDUCER.peer_id_bytes
        assert not outsider.node.scores.is_banned(reducer, _now())
        me = reporter.node.identity.peer_id_bytes
        assert await reporter.averager.proofs.publish([genuine_proof()], [me], me) >= 1
        # No round and no call: the background read finds it.
        with trio.fail_after(10):
            while not outsider.node.scores.is_banned(reducer, _now()):
                await trio.sleep(0.05)
        outsider.averager.uninstall()
        assert outsider.averager._proof_reading is None
        reads_at_stop = outsider.averager.proofs._last_fetch
        await trio.sleep(1.0)
        assert outsider.averager.proofs._last_fetch == reads_at_stop
        print("\nbanned by the proofs' background read; no read after uninstall")


async def test_only_a_first_round_since_install_reads_the_proofs_before_it_announces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rounds after the first leave the reads to the background; with rounds of unknown or
    slow pace the background reads again ``PROOF_READ_AFTER_ROUND`` after each, so that a
    proof published as a round ends bans its reducer before the next; reinstalled, the
    averager's next round reads first again."""
    monkeypatch.setattr(averager_module, "PROOF_READ_AFTER_ROUND", 1.0)
    settings = AveragingSettings(
        matchmaking=MatchmakingSettings(gather_window=0.3, settle=0.1, min_group=2)
    )
    async with averaging_swarm(3, settings) as members:
        pair, reporter = members[:2], members[2]
        watched = pair[0].averager
        watched.proofs.fetch_interval = 60.0  # no periodic read within the test
        events: list[str] = []
        real_fetch, real_announce = watched.proofs.fetch, watched.matchmaker.announce

        async def fetch(*, force: bool = False) -> list[bytes]:
            task = trio.lowlevel.current_task().name
            events.append("background read" if "_read_proofs" in task else "read")
            return await real_fetch(force=force)

        async def announce(announcement: AveragingAnnouncement) -> int:
            events.append(f"announce {announcement.round}")
            return await real_announce(announcement)

        monkeypatch.setattr(watched.proofs, "fetch", fetch)
        monkeypatch.setattr(watched.matchmaker, "announce", announce)

        async def round_of_pair(round_: int) -> None:
            async with trio.open_nursery() as nursery:
                for m in pair:
                    nursery.start_soon(m.averager.all_reduce, np.ones(4096, np.float32), 1.0,
                                       round_)

        for round_ in (1, 2, 3):
            await round_of_pair(round_)
        assert events[:2] == ["read", "announce 1"], events
        assert "read" not in events[2:], events
        # A proof published just after a round: the read after it finds it.
        me = reporter.node.identity.peer_id_bytes
        assert await reporter.averager.proofs.publish([genuine_proof()], [me], me) >= 1
        reducer = REDUCER.peer_id_bytes
        with trio.fail_after(10):
            while not pair[0].node.scores.is_banned(reducer, _now()):
                await trio.sleep(0.05)
        assert "background read" in events, events
        watched.uninstall()
        await trio.sleep(1.1)  # past MIN_PROOF_READ_GAP since the last read
        events.clear()
        await round_of_pair(4)
        assert events[:2] == ["read", "announce 4"], events
        print(f"\nreads and announcements of one member: {events}")


async def test_a_member_publishes_its_rounds_proofs_for_peers_outside_the_group() -> None:
    settings = AveragingSettings(
        max_chunk=64 * 1024,
        chunk_timeout=5.0,
        matchmaking=MatchmakingSettings(gather_window=0.5, settle=0.3, min_group=2),
    )
    async with averaging_swarm(3, settings) as members:
        pair, outsider = members[:2], members[2]
        reports: list[RoundReport | None] = [None, None]

        async def average(i: int) -> None:
            reports[i] = await pair[i].averager.all_reduce(np.ones(4096, np.float32), 1.0, 1)

        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(average, i)
        report = reports[0]
        assert report is not None and len(report.members) == 2, report
        # The round was honest; what the member does with a report that holds a proof is the
        # same whichever reducer the proof names.
        await pair[0].averager._publish_proofs(
            dataclasses.replace(report, equivocation_proofs=(genuine_proof(),))
        )
        reducer = REDUCER.peer_id_bytes
        banned: list[bytes] = []
        with trio.move_on_after(20.0):
            while not banned:
                banned = await outsider.averager.proofs.fetch(force=True)
                await trio.sleep(0.2)
        assert banned == [reducer] and outsider.node.scores.is_banned(reducer, _now()), banned
        print(f"\nround of {len(report.members)}: its member published the proof in the "
              "background; a peer outside the group read it and banned the reducer")


def test_self_made_proofs_cost_a_bounded_check_each_and_ban_only_their_maker() -> None:
    """A fresh identity can equivocate against itself: the proof is valid and bans only the
    key that signed it. A fetch checks at most ``MAX_PROOFS_CHECKED_PER_FETCH`` new ones."""
    sybil = Identity.from_seed(b"\x09" * 32)
    own = {"reducer": sybil.peer_id_bytes, "contributors": (sybil.peer_id_bytes,),
           "weights": (1.0,)}
    header = result(TRUE_VALUES, signer=sybil, **own)
    other = result(SHIFTED_VALUES, signer=sybil, **own)
    assert check_proof_value(encode(make_proof(header, other))) == sybil.peer_id_bytes
    with pytest.raises(ProtocolViolation):
        check_proof_value(encode(EquivocationProof(encode(header), encode(header) + b"\x00")))
    seen = SeenProofs(limit=3)
    for i in range(5):
        seen.add(bytes([i]))
    assert len(seen) == 3 and bytes([0]) not in seen and bytes([4]) in seen
    print(f"\nself-made proof bans its maker only; at most {MAX_PROOFS_CHECKED_PER_FETCH} new "
          "proofs checked per fetch; seen-proof memory bounded")


def test_members_publish_the_proofs_of_a_round_in_turn() -> None:
    proofs = [b"p-one", b"p-two", b"p-three"]
    members = [bytes([i]) * 4 for i in range(6)]
    chosen = {proof_to_publish(proofs, members, m) for m in members}
    assert chosen == set(proofs), chosen
    assert proof_to_publish([b"x" * (MAX_VALUE + 1)], members, members[0]) is None
