"""The averager over real loopback nodes: DHT matchmaking, data-plane channels, all-reduce."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import trio

from dandelion_p2p.averaging.averager import Averager, AveragingSettings, NoGroup
from dandelion_p2p.averaging.group import bounded_weights
from dandelion_p2p.averaging.kept_channels import PURPOSE_KEPT, PURPOSE_ONE_ROUND
from dandelion_p2p.averaging.matchmaking import Matchmaker, MatchmakingSettings
from dandelion_p2p.averaging.messages import (
    AveragingAnnouncement,
    ChannelHello,
    ChannelIdle,
    encode_hello,
    idle_in,
)
from dandelion_p2p.averaging.report import RoundReport
from dandelion_p2p.dataplane.errors import ChannelClosed
from dandelion_p2p.dataplane.service import DataPlane
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.reputation.book import ScoreEvent
from dandelion_p2p.runconfig.schema import DEFAULT_MAX_WEIGHT
from tests.swarm import swarm

RUN = b"test-run"


@dataclass
class Member:
    node: SwarmNode
    dataplane: DataPlane
    averager: Averager


@asynccontextmanager
async def averaging_swarm(
    n: int, settings: AveragingSettings, *, reachable: bool = True
) -> AsyncIterator[list[Member]]:
    """``n`` nodes, each with a data plane and an averager. ``reachable``: the data planes
    open their own TCP connections; else their channels ride the libp2p connections."""
    async with swarm(n) as nodes, AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        members = []
        for node in nodes:
            dp = DataPlane(node.host, node.identity, listen_ip="127.0.0.1",
                           reachable=reachable)
            await nursery.start(dp.run)
            averager = Averager(
                signer=node.identity,
                records=node.records,
                links=node,
                reputation=node,
                dataplane=dp,
                background=node.background,
                run=RUN,
                settings=settings,
            )
            members.append(Member(node, dp, averager))
        try:
            yield members
        finally:
            nursery.cancel_scope.cancel()


async def round_of(
    members: list[Member], buffers: list[np.ndarray], round_: int,
    weights: list[float] | None = None,
) -> list[RoundReport | None]:
    """Round ``round_`` of every member at once (weight 1 each unless ``weights``), within
    60 s: each member's report, in order."""
    reports: list[RoundReport | None] = [None] * len(members)

    async def run(i: int) -> None:
        weight = 1.0 if weights is None else weights[i]
        reports[i] = await members[i].averager.all_reduce(buffers[i], weight, round_)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(len(members)):
                nursery.start_soon(run, i)
    return reports


# The members of one test share its trio loop and start their rounds together: half a second
# gathers every announcement.
GATHER = MatchmakingSettings(gather_window=0.5, settle=0.3)
FAST = AveragingSettings(max_chunk=64 * 1024, chunk_timeout=5.0, matchmaking=GATHER)


@pytest.mark.parametrize("n", [2, 4])
async def test_group_averages_to_the_weighted_mean(n: int) -> None:
    rng = np.random.default_rng(n)
    size = 300_000
    vectors = [rng.standard_normal(size).astype(np.float32) + 1 for _ in range(n)]
    weights = [float(w) for w in rng.integers(1, 10, n)]
    # The group holds each claim bounded by twice the round's median (group.bounded_weights).
    held = list(bounded_weights(dict(enumerate(weights)), DEFAULT_MAX_WEIGHT).values())
    expected = sum(w * v.astype(np.float64) for w, v in zip(held, vectors, strict=True))
    expected /= sum(held)
    async with averaging_swarm(n, FAST) as members:
        reports = [None] * n
        buffers = [v.copy() for v in vectors]

        async def run(i: int) -> None:
            reports[i] = await members[i].averager.all_reduce(buffers[i], weights[i], 1)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(run, i)
    for report in reports:
        assert report is not None and report.complete and report.fraction_averaged == 1.0
    for buf in buffers:
        np.testing.assert_allclose(buf, expected, rtol=1e-6, atol=1e-6)
        assert np.array_equal(buf, buffers[0])


async def test_a_ban_held_by_one_peer_only_keeps_one_group_and_cuts_the_peer_off_there() -> None:
    n, size = 3, 200_000
    rng = np.random.default_rng(5)
    vectors = [rng.standard_normal(size).astype(np.float32) for _ in range(n)]
    settings = AveragingSettings(
        max_chunk=64 * 1024,
        chunk_timeout=2.0,
        matchmaking=MatchmakingSettings(gather_window=1.0, settle=0.3),
    )
    async with averaging_swarm(n, settings) as members:
        judge, accused = members[0], members[2]
        accused_id = accused.node.identity.peer_id_bytes
        judge.node.scores.record(accused_id, ScoreEvent.BAD_SIGNATURE, time.time(), count=10)
        assert judge.node.scores.is_banned(accused_id, time.time())
        buffers = [v.copy() for v in vectors]
        reports = await round_of(members, buffers, 1)
    done = [r for r in reports if r is not None]
    assert len(done) == n
    # One group for all three: the lone ban did not split it.
    assert all(r.members == done[0].members and len(r.members) == n for r in done)
    excluded = {(e.peer, e.reason.value) for e in done[0].excluded}
    assert (accused_id, "banned") in excluded
    assert not done[0].complete
    # The judge summed nothing of the accused's and took nothing it reduced; the third
    # peer, which holds no ban, reduced with everyone and the judge accepts its results.
    judge_id = judge.node.identity.peer_id_bytes
    spans = {span.reducer: span for span in done[0].spans}
    assert all(accused_id not in c.contributors for c in spans[judge_id].chunks)
    assert all(c.status.value != "averaged" for c in spans[accused_id].chunks)
    third = members[1].node.identity.peer_id_bytes
    assert all(accused_id in c.contributors for c in spans[third].chunks)


async def test_rounds_measure_each_links_receive_rate() -> None:
    async with averaging_swarm(2, FAST) as members:
        buffers = [np.full(1_000_000, i + 1.0, dtype=np.float32) for i in range(2)]

        async def run(i: int) -> None:
            await members[i].averager.all_reduce(buffers[i], 1.0, 1)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(run, i)
        a, b = members
        rows = {c["peer_id"]: c for c in a.node.connected_peers()}
        rate = rows[b.node.peer_id.to_base58()]["bandwidth_mbps"]
        assert rate is not None and rate > 0


async def test_a_peer_late_for_a_round_learns_it_at_once_instead_of_timing_out() -> None:
    slow = AveragingSettings(
        max_chunk=64 * 1024,
        chunk_timeout=60.0,
        matchmaking=GATHER,
    )
    async with averaging_swarm(3, slow) as (a, b, late):
        buffers = [np.full(10_000, float(i), dtype=np.float32) for i in range(3)]
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i, member in enumerate((a, b)):
                    nursery.start_soon(member.averager.all_reduce, buffers[i], 1.0, 5)
            assert np.array_equal(buffers[0], np.full(10_000, 0.5, dtype=np.float32))
            # The pair's "finished" republications go out in the background.
            assert late.node.dht is not None
            reader = Matchmaker(late.node.dht, settings=slow.matchmaking)
            while True:
                seen = await reader.read(RUN, 5)
                if len(seen) == 2 and all(ann.finished for ann in seen.values()):
                    break
                await trio.sleep(0.1)
        started = time.monotonic()
        with trio.fail_after(50), pytest.raises(NoGroup) as caught:
            await late.averager.all_reduce(buffers[2], 1.0, 5)
        # Matchmaking time, far from the 60 s chunk timeout it used to wait out.
        assert time.monotonic() - started < 20.0
        assert caught.value.late == 2
        assert np.array_equal(buffers[2], np.full(10_000, 2.0, dtype=np.float32))

        # The next round, the three of them average together as usual.
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i, member in enumerate((a, b, late)):
                    nursery.start_soon(member.averager.all_reduce, buffers[i], 1.0, 6)
        assert all(np.array_equal(buf, buffers[0]) for buf in buffers)


async def test_a_peer_with_nothing_to_add_takes_the_result_and_reduces_nothing() -> None:
    """A joiner (weight 0, ``reduces=False``) gets the others' average without reducing a
    span."""
    rng = np.random.default_rng(5)
    size = 200_000
    async with averaging_swarm(3, FAST) as members:
        vectors = [rng.standard_normal(size).astype(np.float32) for _ in range(2)]
        buffers = [v.copy() for v in vectors] + [np.zeros(size, dtype=np.float32)]
        reports: list[RoundReport | None] = [None] * 3

        async def run(i: int, round_: int) -> None:
            joiner = i == 2
            reports[i] = await members[i].averager.all_reduce(
                buffers[i], 1e-6 if joiner else 1.0, round_, reduces=not joiner)

        async with trio.open_nursery() as nursery:
            # A peer with nothing to add announces only before the others do.
            nursery.start_soon(run, 2, 1)
            await announced(members[0], members[2], 1)
            for i in range(2):
                nursery.start_soon(run, i, 1)
        joiner_report = reports[2]
        assert joiner_report is not None and joiner_report.complete
        assert members[2].node.identity.peer_id.to_bytes() not in joiner_report.reducers
        assert np.array_equal(buffers[0], buffers[1])
        assert np.array_equal(buffers[2], buffers[0]), "the joiner holds the others' result"
        mean = (vectors[0].astype(np.float64) + vectors[1]) / 2
        assert np.allclose(buffers[0], mean, atol=1e-5)


async def announced(reader: Member, peer: Member, round_: int) -> None:
    """Until ``reader`` reads ``peer``'s announcement of ``round_``."""
    me = peer.node.identity.peer_id.to_bytes()
    with trio.fail_after(5):
        while me not in await reader.averager.matchmaker.read(RUN, round_):
            await trio.sleep(0.01)


async def test_a_peer_with_nothing_to_add_that_comes_after_others_announced_waits() -> None:
    # Some members might read its announcement and others not: their groups would differ and
    # the round be lost for all. It takes no part; the others average as if it never came.
    size = 50_000
    async with averaging_swarm(3, FAST) as members:
        buffers = [np.full(size, 1.0, np.float32), np.full(size, 3.0, np.float32)]
        reports: list[RoundReport | None] = [None, None]

        async def run(i: int) -> None:
            reports[i] = await members[i].averager.all_reduce(buffers[i], 1.0, 1)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(run, i)
                await announced(members[2], members[0], 1)
                await announced(members[2], members[1], 1)
                with pytest.raises(NoGroup) as info:
                    await members[2].averager.all_reduce(
                        np.zeros(size, np.float32), 1e-6, 1, reduces=False)
                assert info.value.late == 2
        joiner = members[2].node.identity.peer_id.to_bytes()
        assert joiner not in await members[0].averager.matchmaker.read(RUN, 1)
    for report in reports:
        assert report is not None and report.fraction_averaged == 1.0
        assert len(report.members) == 2
    np.testing.assert_allclose(buffers[0], 2.0)


async def test_a_joiner_one_member_cannot_reach_leaves_the_others_one_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Member 0 gets no channel to the joiner (member 2), which reduces nothing; member 1
    # does. Narrowing the group for it would give member 0 a group id of its own, and the
    # two members would refuse each other's spans: member 0 cuts it off alone instead.
    size = 200_000
    async with averaging_swarm(3, FAST) as members:
        joiner = members[2].node.identity.peer_id
        links = members[0].averager.member_links
        real_link = links.link

        async def no_channel_to_the_joiner(rnd: Any, round_: int, peer: bytes) -> None:
            if peer == joiner.to_bytes():
                rnd.writing.discard(peer)
                rnd.fail(peer, "no channel: cut off by the test")
                return
            await real_link(rnd, round_, peer)

        monkeypatch.setattr(links, "link", no_channel_to_the_joiner)
        buffers = [np.full(size, 1.0, np.float32), np.full(size, 2.0, np.float32),
                   np.zeros(size, np.float32)]
        reports: list[RoundReport | None] = [None] * 3

        async def run(i: int) -> None:
            reports[i] = await members[i].averager.all_reduce(
                buffers[i], 1e-6 if i == 2 else 1.0, 1, reduces=i != 2)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, 2)
                await announced(members[0], members[2], 1)
                for i in range(2):
                    nursery.start_soon(run, i)
    first, second = reports[0], reports[1]
    assert first is not None and second is not None
    for report in (first, second):
        assert report.fraction_averaged == 1.0 and len(report.members) == 3
    assert np.array_equal(buffers[0], buffers[1])
    np.testing.assert_allclose(buffers[0], 1.5, rtol=1e-5)
    assert (joiner.to_bytes(), "failed") in {(e.peer, e.reason.value) for e in first.excluded}


@pytest.mark.parametrize("purpose", [PURPOSE_KEPT, PURPOSE_ONE_ROUND])
async def test_a_channel_for_a_round_that_ended_here_is_closed_at_once(purpose: str) -> None:
    # A member that lost its channel and opens a new one to a peer whose round is over
    # learns it at once (an orderly close; on a kept channel, its ChannelIdle first),
    # instead of waiting for that peer's results until its result timeout.
    async with averaging_swarm(2, FAST) as members:
        buffers = [np.full(50_000, i + 1.0, dtype=np.float32) for i in range(2)]
        async with trio.open_nursery() as nursery:
            for member, buf in zip(members, buffers, strict=True):
                nursery.start_soon(member.averager.all_reduce, buf, 1.0, 1)
        opener, acceptor = sorted(members, key=lambda m: m.node.identity.peer_id_bytes)
        channel = await opener.dataplane.open(acceptor.node.identity.peer_id, purpose)
        await channel.send(encode_hello(ChannelHello(RUN, 1, b"\0" * 32)))
        with trio.fail_after(5):
            if purpose == PURPOSE_KEPT:
                assert idle_in(await channel.receive()) == ChannelIdle(run=RUN, round=1)
            with pytest.raises(ChannelClosed):
                await channel.receive()
        await channel.aclose()


async def test_a_hello_for_a_round_that_never_runs_here_is_forgotten_when_a_later_one_ends(
) -> None:
    async with averaging_swarm(2, FAST) as members:
        buffers = [np.full(50_000, i + 1.0, dtype=np.float32) for i in range(2)]

        async def both_run(round_: int) -> None:
            async with trio.open_nursery() as nursery:
                for member, buf in zip(members, buffers, strict=True):
                    nursery.start_soon(member.averager.all_reduce, buf, 1.0, round_)

        await both_run(1)
        opener, acceptor = sorted(members, key=lambda m: m.node.identity.peer_id_bytes)
        channel = await opener.dataplane.open(acceptor.node.identity.peer_id, PURPOSE_KEPT)
        await channel.send(encode_hello(ChannelHello(RUN, 3, b"\0" * 32)))
        with trio.fail_after(5):
            while 3 not in acceptor.averager._round_ready:
                await trio.sleep(0.01)
        await both_run(4)
        assert acceptor.averager._round_ready == {}, "round 3 never ran there"
        await channel.aclose()


async def test_a_failure_one_of_two_peers_remembers_does_not_keep_them_apart() -> None:
    # Member 0 saw member 1 fail round 1 (its worker died mid-round); member 1 did not see
    # that. Leaving member 1 out of round 2 would leave member 0 alone, while member 1 waited
    # the round out for it and then left member 0 out of round 3 in turn, for good.
    async with averaging_swarm(2, FAST) as members:
        members[0].averager._failed_in_round[members[1].node.identity.peer_id_bytes] = 1
        buffers = [np.full(100_000, i + 1.0, dtype=np.float32) for i in range(2)]
        reports: list[Any] = [None, None]

        async def run(i: int) -> None:
            reports[i] = await members[i].averager.all_reduce(buffers[i], 1.0, 2)

        with trio.fail_after(FAST.chunk_timeout):
            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(run, i)
    for report in reports:
        assert report.complete and report.fraction_averaged == 1.0
    assert np.array_equal(buffers[0], np.full(100_000, 1.5, dtype=np.float32))


async def test_a_buffer_the_round_cannot_use_is_a_plain_value_error() -> None:
    """Found only once the group is formed (inside the round's nursery), the mistake is
    raised as the ``ValueError`` that ``all_reduce`` documents, not wrapped in a group: the
    daemon answers its worker with it instead of logging a crash."""
    async with averaging_swarm(2, FAST) as (a, b):
        broken = np.full(1000, np.nan, dtype=np.float32)
        fine = np.ones(1000, dtype=np.float32)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:

                async def other() -> None:
                    with trio.move_on_after(FAST.chunk_timeout + 5):
                        await b.averager.all_reduce(fine, 1.0, 3)

                nursery.start_soon(other)
                with pytest.raises(ValueError, match="NaN or infinity"):
                    await a.averager.all_reduce(broken, 1.0, 3)


async def test_a_member_that_leaves_the_round_after_it_was_read_is_given_up_at_once() -> None:
    """A peer stops training once the others have read its announcement: the member that
    awaits its channel sees the ``leaving`` announcement that replaced it and goes on without
    it, instead of waiting out ``open_timeout`` (or the chunk timeout) for the channel."""
    slow_open = AveragingSettings(max_chunk=64 * 1024, chunk_timeout=30.0, matchmaking=GATHER,
                                  open_timeout=30.0)
    async with averaging_swarm(2, slow_open) as members:
        # The one that leaves has the smaller id: it would have opened the channel.
        leaver, stayer = sorted(members, key=lambda m: m.node.identity.peer_id.to_bytes())
        leaver_id = leaver.node.identity.peer_id.to_bytes()
        await leaver.averager.matchmaker.announce(AveragingAnnouncement(
            run=RUN, round=7, weight=1.0, bandwidth_mbps=100.0, accepts_connections=True,
            endpoint=leaver.dataplane.endpoint or "",
            expires_at_ms=int((time.time() + 60) * 1000)))
        buffer = np.full(1000, 3.0, np.float32)
        report: list[RoundReport] = []
        started = time.monotonic()
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                report.append(await stayer.averager.all_reduce(buffer, 1.0, 7))

            nursery.start_soon(run)
            with trio.fail_after(10):
                while leaver_id not in stayer.averager.matchmaker.announcers_of(7):
                    await trio.sleep(0.01)
            await leaver.averager.matchmaker.announce_leaving(RUN, [7])
        assert time.monotonic() - started < 10.0  # not the 30 s open and chunk timeouts
        assert report[0].members == (stayer.node.identity.peer_id.to_bytes(),)
        assert np.array_equal(buffer, np.full(1000, 3.0, np.float32))
