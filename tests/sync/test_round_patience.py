"""How long a daemon waits for a group in a round (``Rounds``' patience), over real loopback
averagers."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import trio

from dandelion_p2p.averaging.messages import AveragingAnnouncement
from dandelion_p2p.sync.rounds import MIN_PATIENCE, Rounds
from tests.averaging.test_averager import FAST, RUN, Member, averaging_swarm


def rounds_of(member: Member) -> Rounds:
    """A ``Rounds`` that averages with ``member``'s averager (the parts ``_average`` uses)."""
    rounds = Rounds(state=None, current=None, averagers=None, telemetry=None)  # type: ignore[arg-type]
    rounds._averager_for = lambda document: member.averager  # type: ignore[method-assign]
    return rounds


def document() -> Any:
    return SimpleNamespace(config=SimpleNamespace(
        averaging=SimpleNamespace(gather_window=FAST.matchmaking.gather_window)))


async def round_1(members: list[Member]) -> list[np.ndarray]:
    """Round 1 of the pair (so each expects the other next), and their vectors."""
    buffers = [np.full(10_000, float(i), dtype=np.float32) for i in range(len(members))]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for member, buffer in zip(members, buffers, strict=True):
                nursery.start_soon(member.averager.all_reduce, buffer, 1.0, 1)
    return buffers


async def test_a_peer_stops_waiting_in_a_round_its_partner_went_on_from() -> None:
    """Its partner of round 1 skipped round 2 (it took the swarm's state and stands at round
    3): waiting for it in round 2 for the whole patience would keep the two a round apart,
    each waiting for the other, for as long."""
    async with averaging_swarm(2, FAST) as members:
        stays, went_on = members
        buffers = await round_1(members)
        await went_on.averager.matchmaker.announce(AveragingAnnouncement(
            run=RUN, round=3, weight=1.0, bandwidth_mbps=100.0, accepts_connections=True,
            endpoint=went_on.dataplane.endpoint or "",
            expires_at_ms=int((time.time() + 60) * 1000)))
        rounds = rounds_of(stays)
        started = trio.current_time()
        with trio.fail_after(MIN_PATIENCE / 2):
            result = await rounds._average(buffers[0], 0, document(), 2, 1.0, started)
        took = trio.current_time() - started
    print(f"round 2 given up after {took:.1f} s (patience {MIN_PATIENCE:.0f} s)")
    assert result["averaged"] is False and not rounds.grouped_last
    assert took < 5 * FAST.matchmaking.gather_window + 5


async def test_a_peer_waits_in_a_round_its_partner_has_not_reached_yet() -> None:
    """Without a later announcement the partner is only late: the round waits for it."""
    async with averaging_swarm(2, FAST) as members:
        stays, late = members
        buffers = await round_1(members)
        rounds = rounds_of(stays)
        result: dict[str, Any] = {}

        async def stays_in_round_2() -> None:
            result.update(await rounds._average(buffers[0], 0, document(), 2, 1.0,
                                                trio.current_time()))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stays_in_round_2)
                await trio.sleep(5 * FAST.matchmaking.gather_window + 2)
                assert not result, "it gave up on a partner that is only late"
                await late.averager.all_reduce(buffers[1], 1.0, 2)
    assert result["fraction_averaged"] == 1.0
