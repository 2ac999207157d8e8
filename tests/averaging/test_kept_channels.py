"""Averaging channels kept from one round to the next, over real loopback nodes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np
import pytest
import trio

from dandelion_p2p.averaging import kept_channels
from dandelion_p2p.averaging.kept_channels import PURPOSE_KEPT, PURPOSE_ONE_ROUND
from dandelion_p2p.averaging.member_links import Round
from dandelion_p2p.averaging.messages import (
    ChannelHello,
    ChannelIdle,
    encode_hello,
    encode_idle,
    idle_in,
)
from dandelion_p2p.averaging.report import RoundReport
from dandelion_p2p.averaging.sends import Send
from dandelion_p2p.dataplane.channel import Channel
from tests.averaging.test_averager import FAST, RUN, Member, averaging_swarm


async def rounds(members: list[Member], first: int, count: int, size: int = 200_000
                 ) -> list[list[RoundReport]]:
    """``count`` rounds from ``first`` on, back to back; each member's vector is its index
    plus the round, so every round's mean is known."""
    reports: list[list[RoundReport]] = []
    for round_ in range(first, first + count):
        buffers = [np.full(size, i + round_, dtype=np.float32) for i in range(len(members))]
        got: list[RoundReport | None] = [None] * len(members)

        async def run(i: int, round_: int = round_, buffers: list = buffers,
                      got: list = got) -> None:
            got[i] = await members[i].averager.all_reduce(buffers[i], 1.0, round_)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(len(members)):
                    nursery.start_soon(run, i)
        mean = round_ + (len(members) - 1) / 2
        for buffer in buffers:
            np.testing.assert_allclose(buffer, mean, rtol=1e-6)
            assert np.array_equal(buffer, buffers[0])
        reports.append([r for r in got if r is not None])
    return reports


async def rested(members: list[Member], pairs: int) -> None:
    """Wait until the last round's channels rest: each acceptor holds one idle channel per
    member that opens to it, and each opener one per member it opens to."""
    with trio.fail_after(5):
        while sum(len(m.averager.accepted) for m in members) < pairs:
            await trio.sleep(0.05)
        while sum(len(m.averager.member_links.kept) for m in members) < pairs:
            await trio.sleep(0.05)


def reused(members: list[Member]) -> int:
    return sum(m.averager.member_links.kept.reused for m in members)


async def test_rounds_back_to_back_begin_on_the_channels_of_the_round_before() -> None:
    async with averaging_swarm(3, FAST) as members:
        reports = await rounds(members, 1, 4)
        pairs = 3
        # Every pair's channel of round 1 carried rounds 2 to 4.
        assert reused(members) == pairs * 3
        assert all(m.averager.member_links.reopened == 0 for m in members)
        await rested(members, pairs)
        await trio.sleep(0.2)  # and no more than one per pair
        assert sum(len(m.averager.accepted) for m in members) == pairs
        assert sum(len(m.averager.member_links.kept) for m in members) == pairs
    for round_reports in reports:
        assert len(round_reports) == 3
        assert all(r.complete and r.fraction_averaged == 1.0 for r in round_reports)


async def pair_after_a_round(members: list[Member]) -> tuple[Member, Member]:
    """The opener and the acceptor of a pair whose channel of round 1 rests."""
    await rounds(members, 1, 1)
    await rested(members, 1)
    opener, acceptor = sorted(members, key=lambda m: m.node.identity.peer_id_bytes)
    return opener, acceptor


def before_serving(acceptor: Member,
                   first: Callable[[Channel, ChannelHello], Awaitable[bool]]) -> None:
    """Run ``first`` on each hello the acceptor reads before the round takes the channel;
    False: the round does not (the channel is refused)."""
    serve = acceptor.averager.accepted._serve

    async def serve_after(channel: Channel, hello: ChannelHello) -> bool | None:
        return await serve(channel, hello) if await first(channel, hello) else None

    acceptor.averager.accepted._serve = serve_after  # type: ignore[method-assign]


async def test_a_kept_channel_its_acceptor_closes_as_the_hello_comes_is_replaced() -> None:
    async with averaging_swarm(2, FAST) as members:
        opener, acceptor = await pair_after_a_round(members)
        dropped: list[int] = []

        async def drop_once(channel: Channel, hello: ChannelHello) -> bool:
            if dropped:
                return True
            # As when the acceptor's wait for the next hello ran out just as the hello came:
            # the channel is closed with nothing said on it.
            dropped.append(hello.round)
            await channel.aclose()
            return False

        before_serving(acceptor, drop_once)
        (reports,) = await rounds(members, 2, 1)
        assert dropped == [2]
        assert opener.averager.member_links.kept.reused == 1
        # The hello went out on the kept channel, the acceptor closed it unread: the
        # opener took that for a lost channel and opened another, and nothing was lost.
        assert opener.averager.member_links.reopened == 1
        assert all(r.complete and r.fraction_averaged == 1.0 for r in reports)


async def test_a_peer_that_serves_one_round_channels_only_still_averages() -> None:
    async with averaging_swarm(2, FAST) as members:
        opener, acceptor = sorted(members, key=lambda m: m.node.identity.peer_id_bytes)
        acceptor.averager.install()
        acceptor.dataplane.unregister(PURPOSE_KEPT)  # as a peer of the earlier version
        reports = await rounds(members, 1, 3)
        acceptor_id = acceptor.node.identity.peer_id_bytes
        assert opener.averager.member_links.kept.purpose_for(acceptor_id) == PURPOSE_ONE_ROUND
        assert reused(members) == 0
    for round_reports in reports:
        assert all(r.complete and r.fraction_averaged == 1.0 for r in round_reports)


async def test_a_member_idle_for_another_round_loses_its_channel_not_the_round() -> None:
    async with averaging_swarm(2, FAST) as members:
        opener, acceptor = await pair_after_a_round(members)
        # The acceptor's channel of round 1 waits for the next hello; a frame saying it is
        # idle for round 7 in the middle of round 2 is no end of round 2.
        (kept,) = acceptor.averager.accepted._idle.values()

        async def idle_for_another_round(channel: Channel, hello: ChannelHello) -> bool:
            if channel is kept:
                await channel.send(encode_idle(ChannelIdle(run=RUN, round=7)))
            return True

        before_serving(acceptor, idle_for_another_round)
        (reports,) = await rounds(members, 2, 1)
        assert opener.averager.member_links.reopened == 1
        assert all(r.fraction_averaged == 1.0 for r in reports)


async def test_a_frame_on_an_idle_channel_closes_it_and_the_next_round_opens_anew() -> None:
    async with averaging_swarm(2, FAST) as members:
        opener, acceptor = await pair_after_a_round(members)
        (idle,) = acceptor.averager.accepted._idle.values()
        await idle.send(b"nothing is due between rounds")
        with trio.fail_after(5):
            while len(opener.averager.member_links.kept):
                await trio.sleep(0.05)
            while len(acceptor.averager.accepted):
                await trio.sleep(0.05)
        (reports,) = await rounds(members, 2, 1)
        assert reused(members) == 0
        assert all(r.fraction_averaged == 1.0 for r in reports)


async def test_idle_channels_to_members_a_round_leaves_out_are_closed() -> None:
    async with averaging_swarm(3, FAST) as members:
        await rounds(members, 1, 1)
        await rested(members, 3)
        # The one left out has the largest id: both others opened their channels to it.
        *stays, left_out = sorted(members, key=lambda m: m.node.identity.peer_id_bytes)
        gone = left_out.node.identity.peer_id_bytes
        assert all(gone in m.averager.member_links.kept._idle for m in stays)
        await rounds(stays, 2, 1)
        with trio.fail_after(5):
            while len(left_out.averager.accepted):
                await trio.sleep(0.05)
        for member in stays:
            assert gone not in member.averager.member_links.kept._idle


async def test_a_channel_older_than_kept_for_is_closed_at_its_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kept_channels, "KEPT_FOR", 0.0)
    async with averaging_swarm(2, FAST) as members:
        reports = await rounds(members, 1, 3)
        assert reused(members) == 0
        assert sum(len(m.averager.member_links.kept) for m in members) == 0
    assert all(r.fraction_averaged == 1.0 for rs in reports for r in rs)


def test_an_idle_frame_is_told_from_the_others_without_raising() -> None:
    idle = ChannelIdle(run=RUN, round=3)
    assert idle_in(encode_idle(idle)) == idle
    assert idle_in(encode_hello(ChannelHello(RUN, 3, b"\0" * 32))) is None
    assert idle_in(b"\xff" * 40) is None  # garbage: the state machine judges it
    assert idle_in(encode_idle(idle) + b"x" * 300) is None  # too large to be one


async def test_a_member_that_exits_as_its_round_returns_does_not_hold_up_the_others(
) -> None:
    async with averaging_swarm(4, FAST) as members:
        # The smallest id: every other member is the acceptor of its channel, and waits for
        # the new channel that a lost one would be replaced by.
        leaver, slow, *stays = sorted(members, key=lambda m: m.node.identity.peer_id_bytes)
        channels: list[Channel] = []
        make_channel = leaver.dataplane._channel

        def recorded(*args: object) -> Channel:
            channel = make_channel(*args)  # type: ignore[arg-type]
            channels.append(channel)
            return channel

        leaver.dataplane._channel = recorded  # type: ignore[method-assign]
        await rounds(members, 1, 1)
        await rested(members, 6)
        # The others still wait for one member's echoes when the leaver has them all.
        write = slow.averager.member_links._write
        late = 1.0

        class LateEchoes:
            def __init__(self, channel: Channel, written: list[Send]) -> None:
                self.channel = channel
                self.written = written

            def __getattr__(self, name: str) -> object:
                return getattr(self.channel, name)

            async def send(self, frame: object, **kwargs: object) -> None:
                if self.written and self.written[-1].kind == "echo":
                    await trio.sleep(late)
                    self.written = []
                await self.channel.send(frame, **kwargs)  # type: ignore[arg-type]

        async def write_late(rnd: Round, round_: int, peer: bytes, channel: Channel,
                             written: list[Send], *args: object) -> str | None:
            if peer != leaver.node.identity.peer_id_bytes:
                channel = LateEchoes(channel, written)  # type: ignore[assignment]
            return await write(rnd, round_, peer, channel, written,  # type: ignore[arg-type]
                               *args)

        slow.averager.member_links._write = write_late  # type: ignore[method-assign]
        size = 400_000
        buffers = [np.full(size, i, dtype=np.float32) for i in range(len(members))]
        took: dict[int, float] = {}
        got: dict[int, RoundReport] = {}
        order = [leaver, slow, *stays]

        async def run(i: int) -> None:
            start = trio.current_time()
            got[i] = await order[i].averager.all_reduce(buffers[i], 1.0, 2)
            took[i] = trio.current_time() - start
            if i == 0:
                # As a process that exits once its last round returns: every channel is cut
                # off before anything else here runs, so what its round said is all it said.
                for channel in channels:
                    channel.abort()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(len(members)):
                    nursery.start_soon(run, i)
        assert took[0] < late, "the leaver was done before the others"
        # Nobody waited for the leaver: its channels told the others that it was done.
        assert max(took.values()) < late + FAST.chunk_timeout / 2, took
        assert all(r.complete and r.fraction_averaged == 1.0 for r in got.values())
        assert all(m.averager.member_links.reopened == 0 for m in stays)


async def test_a_member_given_up_on_is_told_the_round_ended_rather_than_cut_off() -> None:
    async with averaging_swarm(2, FAST) as members:
        opener, acceptor = await pair_after_a_round(members)
        # The acceptor's frames come too late: the opener gives it up at its chunk timeout.
        write = acceptor.averager.member_links._write
        late = FAST.chunk_timeout + 1.0

        async def write_late(*args: object) -> str | None:
            await trio.sleep(late)
            return await write(*args)  # type: ignore[arg-type]

        acceptor.averager.member_links._write = write_late  # type: ignore[method-assign]
        size = 200_000
        buffers = [np.full(size, i, dtype=np.float32) for i in range(2)]
        took: dict[int, float] = {}
        got: dict[int, RoundReport] = {}

        async def run(i: int, member: Member) -> None:
            start = trio.current_time()
            got[i] = await member.averager.all_reduce(buffers[i], 1.0, 2)
            took[i] = trio.current_time() - start

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, 0, opener)
                nursery.start_soon(run, 1, acceptor)
        assert acceptor.node.identity.peer_id_bytes in got[0].excluded_peers()
        # The opener ended the channel with its ChannelIdle: the acceptor ended its round
        # when its own late writer did, not a wait for a new channel after a cut-off.
        assert took[1] < late + 2.5, took  # a cut-off costs the acceptor chunk_timeout more
        assert acceptor.averager.member_links.reopened == 0
