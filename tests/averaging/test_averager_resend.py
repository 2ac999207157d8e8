"""A round whose channel is lost mid-way finishes over a new one (real loopback nodes)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import numpy as np
import pytest
import trio
from libp2p.peer.id import ID

from dandelion_p2p.averaging.averager import Averager, AveragingSettings
from dandelion_p2p.averaging.matchmaking import MatchmakingSettings
from dandelion_p2p.averaging.report import RoundReport
from dandelion_p2p.dataplane.service import DataPlane
from dandelion_p2p.net.node import SwarmNode
from tests.swarm import swarm

RUN = b"resend-run"
SIZE = 4_000_000
SETTINGS = AveragingSettings(
    max_chunk=64 * 1024,
    chunk_timeout=10.0,
    matchmaking=MatchmakingSettings(gather_window=0.5, settle=0.3),
)


@asynccontextmanager
async def two_members(direct: bool) -> AsyncIterator[list[tuple[SwarmNode, Averager]]]:
    """Two nodes, each with a data plane (``direct``: channels over their own TCP
    connections, else over the libp2p connection) and an averager."""
    async with swarm(2) as nodes, AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        members = []
        for node in nodes:
            dp = DataPlane(node.host, node.identity, listen_ip="127.0.0.1", reachable=direct)
            await nursery.start(dp.run)
            averager = Averager(
                signer=node.identity, records=node.records, links=node, reputation=node,
                dataplane=dp, background=node.background, run=RUN, settings=SETTINGS,
            )
            members.append((node, averager))
        try:
            yield members
        finally:
            nursery.cancel_scope.cancel()


async def cut_mid_round(members: list[tuple[SwarmNode, Averager]], direct: bool) -> None:
    """Once the first chunks of round 1 have arrived at the first member, cut what carries
    its channel: the data plane's own connection (``direct``) or the libp2p connection."""
    (node, averager), (other, _) = members
    while (moved := averager.bytes_moved(1)) is None or moved[1] < 1_000_000:
        await trio.sleep(0.002)
    peer = other.peer_id
    if direct:
        # The connection fails under the channel, as a network fault would: both ends see
        # it end without the channel's CLOSE.
        channel = averager._rounds[1].channels[peer.to_bytes()]
        channel._transport.stream.socket.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
    else:
        await node.host.get_network().close_peer(ID(peer.to_bytes()))


@pytest.mark.parametrize("direct", [False, True], ids=["libp2p-stream", "direct-tcp"])
async def test_a_channel_lost_mid_round_is_replaced_and_the_round_completes(
    direct: bool,
) -> None:
    rng = np.random.default_rng(7)
    vectors = [rng.standard_normal(SIZE).astype(np.float32) for _ in range(2)]
    expected = (vectors[0].astype(np.float64) + vectors[1]) / 2
    buffers = [v.copy() for v in vectors]
    reports: list[RoundReport | None] = [None, None]
    async with two_members(direct) as members:

        async def run(i: int) -> None:
            reports[i] = await members[i][1].all_reduce(buffers[i], 1.0, 1)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(run, i)
                nursery.start_soon(cut_mid_round, members, direct)
        reopened = [averager.channels_reopened for _, averager in members]
    # The cut landed mid-round: both ends replaced the channel (the opener dialed a new one,
    # the acceptor took it).
    assert reopened == [1, 1]
    for report in reports:
        assert report is not None
        assert report.fraction_averaged == 1.0 and report.complete, report.to_dict()
        assert not report.violations
    assert np.array_equal(buffers[0], buffers[1])
    np.testing.assert_allclose(buffers[0], expected, rtol=1e-6, atol=1e-6)
