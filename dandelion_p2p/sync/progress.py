"""How far a run has trained, as its owner sees it when choosing where a new version applies.

Peers training a run serve their newest checkpoint's step (``StateOffer`` of
``/dandelion/state/1.0.0``); the median of the steps offered is the swarm's step, give or take
one checkpoint interval, which the publisher allows for. Other services reach it through the
``training.swarm_step`` control method.
"""

from __future__ import annotations

import logging

import trio
from libp2p.peer.id import ID

from dandelion_p2p.errors import DandelionError
from dandelion_p2p.net.streams import request
from dandelion_p2p.sync.ports import StatePeers
from dandelion_p2p.sync.statesync_core import (
    MAX_ASKED,
    MAX_REPLY,
    PROTOCOL_ID,
    STATE,
    StateOffer,
    StateOffered,
    robust_step,
)

log = logging.getLogger(__name__)

ASK_TIMEOUT = 5.0


async def swarm_checkpoint_step(node: StatePeers, run: str, *,
                                timeout: float = ASK_TIMEOUT,
                                admitted: frozenset[bytes] | None = None) -> int:
    """The swarm's checkpoint step of ``run``: the median of the newest steps its members and
    connected peers offer (``robust_step``), asking at most ``MAX_ASKED`` of them, all within
    ``timeout`` seconds; -1 if none answered. ``admitted``: a closed run's peers, the only
    ones asked."""
    steps: list[int] = []

    async def ask(peer: ID) -> None:
        try:
            await node.connect_peer(peer)
            reply = await request(node.host, peer, PROTOCOL_ID, StateOffer(run=run), STATE,
                                  max_reply=MAX_REPLY, timeout=timeout)
        except DandelionError as exc:
            log.debug("step of %s from %s: %s", run, peer, exc)
            return
        if isinstance(reply, StateOffered) and reply.run == run and reply.step >= 0:
            steps.append(reply.step)

    with trio.move_on_after(timeout):
        peers = set(node.host.get_network().get_connections_map())
        try:
            peers.update(ID.from_base58(peer) for peer in await node.members())
        except DandelionError as exc:
            log.info("cannot list the swarm's members: %s", exc)
        peers.discard(node.peer_id)
        if admitted is not None:
            peers = {peer for peer in peers if peer.to_bytes() in admitted}
        async with trio.open_nursery() as nursery:
            for peer in sorted(peers, key=lambda p: p.to_bytes())[:MAX_ASKED]:
                nursery.start_soon(ask, peer)
    return robust_step(steps)
