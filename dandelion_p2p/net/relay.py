"""Circuit relay v2: the hop service of public nodes and the reservations of NAT'd peers.

The wire protocol (HOP/STOP messages) is py-libp2p's; this module decides limits, which relays
to hold reservations on, when to renew them, and when to move to another relay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport

from dandelion_p2p.errors import DandelionError
from dandelion_p2p.net import addrs as maddrs
from dandelion_p2p.net.dht.messages import PeerRef
from dandelion_p2p.net.dialer import Dialer
from dandelion_p2p.net.relay_limits import (
    DEFAULT_RECLAIM_AFTER_S,
    DEFAULT_RESERVATIONS_PER_NETWORK,
    BoundedCircuitV2Protocol,
)
from dandelion_p2p.net.streams import close_quietly

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayLimitsConfig:
    max_reservations: int = 128
    max_circuits: int = 64
    circuit_bytes: int = 1 << 30
    circuit_seconds: int = 3600
    reservation_ttl: int = 3600
    # Reservations held by peers of one IPv4 /24 or IPv6 /48.
    max_reservations_per_network: int = DEFAULT_RESERVATIONS_PER_NETWORK
    # An idle reservation at least this old may be reclaimed when the relay is full.
    reclaim_idle_after: float = DEFAULT_RECLAIM_AFTER_S

    def to_libp2p(self) -> RelayLimits:
        return RelayLimits(
            duration=self.circuit_seconds,
            data=self.circuit_bytes,
            max_circuit_conns=self.max_circuits,
            max_reservations=self.max_reservations,
            reservation_ttl=self.reservation_ttl,
        )


def relay_services(
    host: IHost, *, serve_hop: bool, limits: RelayLimitsConfig
) -> tuple[BoundedCircuitV2Protocol, CircuitV2Transport]:
    """The relay protocol (hop if ``serve_hop``, always stop) and the transport to dial circuits."""
    libp2p_limits = limits.to_libp2p()
    protocol = BoundedCircuitV2Protocol(
        host,
        libp2p_limits,
        allow_hop=serve_hop,
        per_network=limits.max_reservations_per_network,
        reclaim_after=limits.reclaim_idle_after,
    )
    roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if serve_hop else RelayRole(0))
    transport = CircuitV2Transport(
        host, protocol, RelayConfig(roles=roles, limits=libp2p_limits)
    )
    return protocol, transport


@dataclass
class Reservation:
    relay: PeerRef
    expires_at: float  # unix seconds

    @property
    def relay_id(self) -> ID:
        return ID(self.relay.peer_id)


# Renew a reservation this long before it expires.
RENEW_MARGIN = 120.0
# A relay that refused or failed is not tried again for this long.
RETRY_AFTER = 30.0
SEARCH_PAUSE_MIN = 2.0
SEARCH_PAUSE_MAX = 60.0


class RelayReservations:
    """Keeps ``want`` reservations on distinct relays, renewing and replacing them.

    ``candidates`` returns the relays to choose from (bootstrap peers, relays found in the
    DHT). ``on_change`` runs whenever the set of reservations changes, so the peer can
    republish its circuit addresses.
    """

    def __init__(
        self,
        host: IHost,
        transport: CircuitV2Transport,
        dialer: Dialer,
        candidates: Callable[[], Awaitable[list[PeerRef]]],
        on_change: Callable[[], Awaitable[None]],
        *,
        want: Callable[[], int] = lambda: 2,
        poll_interval: float = 1.0,
        timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.transport = transport
        self.dialer = dialer
        self.candidates = candidates
        self.on_change = on_change
        self.want = want
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.active: dict[ID, Reservation] = {}
        self._failed_at: dict[bytes, float] = {}
        # When short of relays, looking for more (a DHT lookup) backs off while none turn up.
        self._next_search = 0.0
        self._search_pause = SEARCH_PAUSE_MIN

    def circuit_addrs(self) -> list[str]:
        me = self.host.get_id().to_base58()
        out: list[str] = []
        for r in self.active.values():
            relay_b58 = r.relay_id.to_base58()
            for addr in r.relay.addrs:
                if maddrs.is_relayed(addr):
                    continue
                base = maddrs.without_peer_id(addr)
                out.append(f"{base}/p2p/{relay_b58}/p2p-circuit/p2p/{me}")
        return out

    def status(self) -> list[dict[str, object]]:
        return [
            {
                "relay": r.relay_id.to_base58(),
                "addrs": list(r.relay.addrs),
                "expires_in": round(r.expires_at - time.time(), 1),
            }
            for r in self.active.values()
        ]

    async def _reserve(self, relay: PeerRef) -> Reservation | None:
        relay_id = ID(relay.peer_id)
        stream = None
        try:
            with trio.fail_after(self.timeout):
                await self.dialer.connect(relay_id, relay.addrs)
                stream = await self.host.new_stream(relay_id, [HOP_PROTOCOL_ID])
                ok = await self.transport._make_reservation(stream, relay_id)
        except Exception as exc:  # py-libp2p raises many unrelated types on a failed dial
            log.info("reservation on relay %s failed: %s", relay_id, exc)
            return None
        finally:
            if stream is not None:
                await close_quietly(stream)
        if not ok:
            log.info("relay %s refused a reservation", relay_id)
            return None
        expires = float(self.transport._reservations.get(relay_id, 0)) or (time.time() + 3600)
        return Reservation(relay, expires)

    async def step(self) -> bool:
        """One round of upkeep; returns whether the set of reservations changed."""
        changed = False
        now = time.time()
        for relay_id, r in list(self.active.items()):
            if not self.dialer.is_connected(relay_id) or r.expires_at <= now:
                log.warning("lost reservation on relay %s", relay_id)
                del self.active[relay_id]
                self._failed_at[r.relay.peer_id] = now
                self._next_search = 0.0
                changed = True
            elif r.expires_at - now < RENEW_MARGIN:
                renewed = await self._reserve(r.relay)
                if renewed is not None:
                    self.active[relay_id] = renewed
                else:
                    del self.active[relay_id]
                    self._failed_at[r.relay.peer_id] = now
                    changed = True
        want = self.want()
        if len(self.active) < want and now >= self._next_search:
            before = len(self.active)
            for relay in await self.candidates():
                if len(self.active) >= want:
                    break
                relay_id = ID(relay.peer_id)
                if relay_id in self.active or relay_id == self.host.get_id():
                    continue
                if now - self._failed_at.get(relay.peer_id, -RETRY_AFTER) < RETRY_AFTER:
                    continue
                reservation = await self._reserve(relay)
                if reservation is None:
                    self._failed_at[relay.peer_id] = time.time()
                    continue
                log.info("reserved a slot on relay %s", relay_id)
                self.active[relay_id] = reservation
                changed = True
            if len(self.active) > before:
                self._search_pause = SEARCH_PAUSE_MIN
            else:
                self._search_pause = min(self._search_pause * 2, SEARCH_PAUSE_MAX)
            self._next_search = time.time() + self._search_pause
        return changed

    async def run(self) -> None:
        while True:
            try:
                if await self.step():
                    await self.on_change()
            except DandelionError as exc:
                log.warning("relay upkeep: %s", exc)
            await trio.sleep(self.poll_interval)
