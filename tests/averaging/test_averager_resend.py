"""A round whose channel is lost mid-way finishes over a new one (real loopback nodes)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import trio
from libp2p.peer.id import ID

from dandelion_p2p.averaging.averager import AveragingSettings
from dandelion_p2p.averaging.matchmaking import MatchmakingSettings
from dandelion_p2p.averaging.report import RoundReport
from tests.averaging.test_averager import Member, averaging_swarm

SIZE = 4_000_000
SETTINGS = AveragingSettings(
    max_chunk=64 * 1024,
    chunk_timeout=10.0,
    matchmaking=MatchmakingSettings(gather_window=0.5, settle=0.3),
)


async def cut_mid_round(members: list[Member], direct: bool) -> None:
    """Once the first chunks of round 1 have arrived at the first member, cut what carries
    its channel: the data plane's own connection (``direct``) or the libp2p connection."""
    node, averager, other = members[0].node, members[0].averager, members[1].node
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
    # ``direct``: channels over the data planes' own TCP connections, else over libp2p.
    async with averaging_swarm(2, SETTINGS, reachable=direct) as members:

        async def run(i: int) -> None:
            reports[i] = await members[i].averager.all_reduce(buffers[i], 1.0, 1)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(run, i)
                nursery.start_soon(cut_mid_round, members, direct)
        reopened = [m.averager.channels_reopened for m in members]
    # The cut landed mid-round: both ends replaced the channel (the opener dialed a new one,
    # the acceptor took it).
    assert reopened == [1, 1]
    for report in reports:
        assert report is not None
        assert report.fraction_averaged == 1.0 and report.complete, report.to_dict()
        assert not report.violations
    assert np.array_equal(buffers[0], buffers[1])
    np.testing.assert_allclose(buffers[0], expected, rtol=1e-6, atol=1e-6)
