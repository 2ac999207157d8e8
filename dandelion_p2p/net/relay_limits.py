"""Reservation limits of our relay hop service, on top of py-libp2p's circuit v2 relay.

py-libp2p bounds only the total number of reservations, so a few hundred fresh identities take
every slot. Here a reservation is also bounded per network (IPv4 /24, IPv6 /48), and when the
relay is full an idle reservation (no open circuit) is reclaimed, oldest first from the
network holding the most, before a request from another network is refused. A reservation is
always made for the peer on the connection, never for a peer id the request names.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits, RelayResourceManager

from dandelion_p2p.net.streams import stream_origin
from dandelion_p2p.networks import UNKNOWN_NETWORK

log = logging.getLogger(__name__)

DEFAULT_RESERVATIONS_PER_NETWORK = 8
# A reservation younger than this is not reclaimed: its peer has had no time to be dialled.
DEFAULT_RECLAIM_AFTER_S = 30.0


class BoundedRelayResources(RelayResourceManager):
    """py-libp2p's reservation book with a bound per network and reclaiming of idle slots."""

    def __init__(
        self,
        limits: RelayLimits,
        host: IHost,
        *,
        per_network: int = DEFAULT_RESERVATIONS_PER_NETWORK,
        reclaim_after: float = DEFAULT_RECLAIM_AFTER_S,
    ) -> None:
        super().__init__(limits, host)
        self.per_network = per_network
        self.reclaim_after = reclaim_after
        self.reclaimed = 0
        self.refused = 0
        self._network_of: dict[ID, str] = {}
        self._reserved_at: dict[ID, float] = {}

    def note_origin(self, peer_id: ID, network: str) -> None:
        """The network the peer's reservation request came from (before it is decided)."""
        self._network_of[peer_id] = network

    def reservations_by_network(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for peer_id in self._reservations:
            network = self._network_of.get(peer_id, UNKNOWN_NETWORK)
            counts[network] = counts.get(network, 0) + 1
        return counts

    def can_accept_reservation(self, peer_id: ID) -> bool:
        self._forget_gone(deciding=peer_id)
        existing = self._reservations.get(peer_id)
        if existing is not None and not existing.is_expired():
            return True
        network = self._network_of.get(peer_id, UNKNOWN_NETWORK)
        if self.reservations_by_network().get(network, 0) >= self.per_network:
            self.refused += 1
            return False
        if len(self._reservations) >= self.limits.max_reservations and not self._reclaim_idle():
            self.refused += 1
            return False
        return True

    def create_reservation(self, peer_id: ID) -> Any:
        self._reserved_at[peer_id] = time.monotonic()
        return super().create_reservation(peer_id)

    def _forget_gone(self, *, deciding: ID) -> None:
        """Drop expired reservations and those whose peer has disconnected (no longer valid),
        and the bookkeeping of every peer without a reservation but the one being decided."""
        self._clean_expired()
        for peer_id in [p for p in self._reservations if not self._is_peer_connected(p)]:
            del self._reservations[peer_id]
        for peer_id in [p for p in self._network_of if p not in self._reservations]:
            if peer_id != deciding:
                del self._network_of[peer_id]
        for peer_id in [p for p in self._reserved_at if p not in self._reservations]:
            del self._reserved_at[peer_id]

    def _reclaim_idle(self) -> bool:
        now = time.monotonic()
        counts = self.reservations_by_network()
        idle = [
            peer_id
            for peer_id, reservation in self._reservations.items()
            if reservation.active_connections == 0
            and now - self._reserved_at.get(peer_id, now) >= self.reclaim_after
        ]
        if not idle:
            return False
        victim = max(
            idle,
            key=lambda p: (
                counts.get(self._network_of.get(p, UNKNOWN_NETWORK), 0),
                -self._reserved_at.get(p, now),
            ),
        )
        log.info("reclaiming the idle relay reservation of %s", victim)
        del self._reservations[victim]
        self._reserved_at.pop(victim, None)
        self._network_of.pop(victim, None)
        self.reclaimed += 1
        return True


class BoundedCircuitV2Protocol(CircuitV2Protocol):
    """Circuit v2 whose reservations go through ``BoundedRelayResources``."""

    def __init__(
        self,
        host: IHost,
        limits: RelayLimits,
        *,
        allow_hop: bool,
        per_network: int = DEFAULT_RESERVATIONS_PER_NETWORK,
        reclaim_after: float = DEFAULT_RECLAIM_AFTER_S,
    ) -> None:
        super().__init__(host, limits=limits, allow_hop=allow_hop)
        self.bounded_resources = BoundedRelayResources(
            limits, host, per_network=per_network, reclaim_after=reclaim_after
        )
        self.resource_manager = self.bounded_resources

    async def _handle_reserve(self, stream: INetStream, msg: Any) -> None:
        # A request naming another peer would let one connection hold slots for many ids.
        msg.ClearField("peer")
        peer_id = stream.muxed_conn.peer_id
        _, network = stream_origin(stream)
        self.bounded_resources.note_origin(peer_id, network)
        await super()._handle_reserve(stream, msg)
