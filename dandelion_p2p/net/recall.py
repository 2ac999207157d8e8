"""The node's use of its swarm memory (``net.swarm_memory``): what it notes while running, and
how it finds the swarm again when every configured bootstrap peer is gone."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from libp2p.peer.id import ID

from dandelion_p2p.errors import PeerUnavailable
from dandelion_p2p.net.dht.messages import PeerRef
from dandelion_p2p.net.origin import peer_network
from dandelion_p2p.net.swarm_memory import (
    MEMORY_FILENAME,
    ROLE_DHT,
    ROLE_RELAY,
    SwarmMemory,
    load_memory,
    save_memory,
)
from dandelion_p2p.networks import UNKNOWN_NETWORK

if TYPE_CHECKING:
    from dandelion_p2p.net.node import SwarmNode

log = logging.getLogger(__name__)

NOTE_INTERVAL = 30.0
"""Seconds between looks at who we are connected to (and saves of the memory)."""
FALLBACK_DIALS = 16
"""Remembered peers dialed at most when the bootstrap peers fail: enough to meet a few live
ones after a long absence, few enough that a poisoned memory makes us dial little."""
WAIT_WARNING_INTERVAL = 10.0


class SwarmRecall:
    def __init__(self, node: SwarmNode, data_dir: Path | None) -> None:
        self.node = node
        self.path = data_dir / MEMORY_FILENAME if data_dir is not None else None
        self.memory = SwarmMemory()
        self.fallback: list[PeerRef] = []
        """Remembered peers that answered when no configured bootstrap peer did: the node
        joins (DHT, reachability checks, relays) through them as through bootstrap peers."""

    def load(self) -> None:
        if self.path is not None:
            self.memory = load_memory(self.path, time.time())
            if len(self.memory):
                log.info("remembering %d peers of the swarm from %s", len(self.memory), self.path)

    def save(self) -> None:
        if self.path is None:
            return
        try:
            save_memory(self.memory, self.path)
        except OSError as exc:
            log.warning("cannot save the swarm memory to %s: %s", self.path, exc)

    def note_connected(self) -> None:
        """Remember the relays we hold reservations with and the DHT servers in our routing
        table that we hold a direct connection to (so that their network is the one they
        really connect from)."""
        node, now = self.node, time.time()
        seen: list[tuple[bytes, tuple[str, ...], str]] = []
        if node.reservations is not None:
            for r in node.reservations.active.values():
                seen.append((r.relay.peer_id, tuple(r.relay.addrs), ROLE_RELAY))
        if node.dht is not None:
            seen.extend((c.peer_id, c.addrs, ROLE_DHT) for c in node.dht.table.contacts())
        for peer_id, addrs, role in seen:
            if not node.dialer.is_connected(ID(peer_id)):
                continue
            network = peer_network(node.host, ID(peer_id), direct_only=True)
            if network != UNKNOWN_NETWORK:
                self.memory.note(peer_id, addrs, role, network, now)

    async def run(self) -> None:
        try:
            while True:
                await trio.sleep(NOTE_INTERVAL)
                self.note_connected()
                self.save()
        finally:
            self.note_connected()
            self.save()

    def relay_refs(self) -> list[PeerRef]:
        return [
            PeerRef(peer_id=p.peer_id, addrs=p.addrs)
            for p in self.memory.peers(time.time(), ROLE_RELAY)
        ]

    async def reach_remembered(self) -> list[PeerRef]:
        """Dial remembered peers (relays first, then the most recently seen) and return the
        ones that answered; they become ``fallback``."""
        me = self.node.peer_id.to_bytes()
        candidates = [p for p in self.memory.peers(time.time()) if p.peer_id != me]
        candidates = candidates[:FALLBACK_DIALS]
        if not candidates:
            return []
        log.warning(
            "no bootstrap peer answered; trying %d peers remembered from earlier runs",
            len(candidates),
        )
        answered: list[PeerRef] = []

        async def one(ref: PeerRef) -> None:
            try:
                await self.node.dialer.connect(ID(ref.peer_id), ref.addrs)
            except PeerUnavailable as exc:
                log.info("remembered peer %s unreachable: %s", ID(ref.peer_id), exc)
                return
            answered.append(ref)

        async with trio.open_nursery() as nursery:
            for p in candidates:
                nursery.start_soon(one, PeerRef(peer_id=p.peer_id, addrs=p.addrs))
        log.info("%d remembered peers answered", len(answered))
        self.fallback = answered
        return answered

    def has_peers_to_join(self) -> bool:
        """Whether this node joins an existing swarm (bootstrap peers configured, or a
        remembered swarm), rather than seeding a new one."""
        return bool(self.node.bootstrap_refs) or len(self.memory) > 0


async def wait_for_swarm(node: SwarmNode) -> None:
    """Return once the node holds a connection, warning while it does not (the node's rejoin
    loop keeps retrying meanwhile). A node seeding a new swarm returns at once."""
    if not node.recall.has_peers_to_join():
        return
    while not node.host.get_network().get_connections():
        log.warning(
            "not connected to any peer: none of %d bootstrap and %d remembered peers answered; "
            "retrying every %g s",
            len(node.bootstrap_refs),
            len(node.recall.memory),
            node.settings.rejoin_interval,
        )
        with trio.move_on_after(WAIT_WARNING_INTERVAL):
            while not node.host.get_network().get_connections():
                await trio.sleep(0.2)
