"""The swarm node: one libp2p host with our DHT, relay handling, reachability and notes.

This is the network core every daemon runs, public relay or NAT'd peer alike. It owns no
training or averaging logic and knows no feature: features register their own protocols on
``host``, and the composition root passes in their DHT namespaces (``namespaces``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import expand_wildcard_address

from dandelion_p2p import __version__
from dandelion_p2p.errors import ConfigError, DandelionError, PeerUnavailable, ProtocolViolation
from dandelion_p2p.identity import Identity
from dandelion_p2p.net import addrs as maddrs
from dandelion_p2p.net.announce import (
    ANNOUNCEMENT_TTL,
    MEMBERS_NAMESPACE,
    PEER_NAMESPACE,
    RELAYS_NAMESPACE,
    ROLE_DHT_SERVER,
    ROLE_RELAY,
    PeerAnnouncement,
    decode_announcement,
    encode_announcement,
    register_core_namespaces,
)
from dandelion_p2p.net.circuits import transport_addrs
from dandelion_p2p.net.dht.messages import PeerRef
from dandelion_p2p.net.dht.node import DHTNode
from dandelion_p2p.net.dht.records import NamespaceRegistration, RecordValidator, StoreLimits
from dandelion_p2p.net.dialback.protocol import dial_back_request
from dandelion_p2p.net.dialback.service import DialBackService, ask_dial_back
from dandelion_p2p.net.dialer import Dialer
from dandelion_p2p.net.host import build_host
from dandelion_p2p.net.liveness import ConnectionLiveness
from dandelion_p2p.net.notes.service import NoteService
from dandelion_p2p.net.ports import RecordStore
from dandelion_p2p.net.punch_retry import PunchRetries
from dandelion_p2p.net.recall import SwarmRecall
from dandelion_p2p.net.relay import RelayLimitsConfig, RelayReservations, relay_services
from dandelion_p2p.net.upgrade import GracefulUpgrades
from dandelion_p2p.reputation.book import SCORE_EVENT_OF, ScoreBook, ScoreEvent
from dandelion_p2p.reputation.store import SCORES_FILENAME, load_book, save_book
from dandelion_p2p.wire import RejectCode
from dandelion_p2p.wire.frame_budget import PROCESS_FRAME_BUDGET, FrameBudgetLimits

if TYPE_CHECKING:
    from dandelion_p2p.net.portmapping import PortForwarding

log = logging.getLogger(__name__)

MAX_VIOLATORS_SHOWN = 10_000
"""Peers whose violation counts ``status`` keeps."""

# A transfer smaller than this is timed by latency more than by bandwidth.
MIN_MEASURED_BYTES = 1 << 20

Reachability = Literal["auto", "public", "private"]

@dataclass(frozen=True)
class NodeSettings:
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    announce: tuple[str, ...] = ()
    bootstrap: tuple[str, ...] = ()
    network: str = "dandelion"
    relay: bool = False
    relay_limits: RelayLimitsConfig = field(default_factory=RelayLimitsConfig)
    reachability: Reachability = "auto"
    relays_wanted: int = 2
    upnp: bool = False
    dial_timeout: float = 10.0
    request_timeout: float = 10.0
    dht_k: int = 20
    dht_replicas: int = 8
    dht_store_bytes: int = 64 * 1024 * 1024
    """What remote peers can make this node hold as DHT records, in bytes, in total."""
    frame_budget: FrameBudgetLimits | None = None
    """Bounds of the process-wide budget for partly received frames; None keeps the
    process's (several nodes in one test process share one budget)."""
    data_dir: Path | None = None
    """Where peer scores persist; None keeps them in memory only."""
    rejoin_interval: float = 5.0
    """Seconds between checks for a node cut off from everyone (or with an emptied routing
    table), which then joins through its bootstrap peers again."""


def parse_bootstrap(addr: str) -> PeerRef:
    """``/ip4/.../tcp/N/p2p/<id>`` -> PeerRef. Raises ConfigError for anything else."""
    ma = maddrs.parse(addr)
    if ma is None:
        raise ConfigError(f"bootstrap address {addr!r} is not a multiaddr")
    try:
        peer_b58 = ma.value_for_protocol("p2p")
        peer_id = ID.from_base58(str(peer_b58))
    except Exception:
        raise ConfigError(f"bootstrap address {addr!r} must end in /p2p/<peer id>") from None
    return PeerRef(peer_id=peer_id.to_bytes(), addrs=(maddrs.without_peer_id(addr),))


class SwarmNode:
    """Run with ``async with node.running(): ...``; everything stops when the block exits.

    ``namespaces`` register the features' DHT namespaces beside the node's own (peers,
    members, relays). Every node should get every feature's: a DHT server stores the records
    of features it does not take part in, since peers behind NAT rely on public nodes to
    hold theirs.
    """

    def __init__(
        self,
        identity: Identity,
        settings: NodeSettings,
        *,
        namespaces: Iterable[NamespaceRegistration] = (),
    ) -> None:
        self.identity = identity
        self.settings = settings
        self.peer_id = ID(identity.peer_id_bytes)
        self.host: IHost = build_host(
            identity, announce=settings.announce, dial_timeout=settings.dial_timeout
        )
        self.relay_protocol, self.relay_transport = relay_services(
            self.host, serve_hop=settings.relay, limits=settings.relay_limits
        )
        # DCUtR: peers connected through a relay try to open a direct connection by
        # simultaneous dials from both sides; it works across NATs that drop unsolicited
        # packets, not across those that answer them with a reset.
        self.hole_punching = DCUtRProtocol(self.host)
        # A connection that replaces another (a hole punch) lets the old one finish its
        # streams; a connection that stops carrying anything (a hung relay) is closed.
        self.liveness = ConnectionLiveness(self.host, on_dead=self._connection_died)
        self.upgrades = GracefulUpgrades(
            self.host, self.hole_punching, suspect=self.liveness.is_quiet
        )
        # DCUtR gives up after three punches; a path that opens later is tried again.
        self.punch_retries = PunchRetries(self.host, self.hole_punching)
        self.dialer = Dialer(
            self.host, timeout=settings.dial_timeout, relay_transport=self.relay_transport
        )
        self.validator = RecordValidator()
        register_core_namespaces(self.validator)
        for register in namespaces:
            register(self.validator)
        self.bootstrap_refs = [parse_bootstrap(a) for a in settings.bootstrap]
        # Measured bulk receive rate per peer, in Mbit/s (averaging rounds feed it).
        self.link_mbps: dict[bytes, float] = {}
        self.reachable = settings.reachability == "public" or (
            settings.reachability == "auto" and settings.relay
        )
        self.mapped_addrs: list[str] = []
        self.violations: dict[str, int] = {}
        self.scores_path = settings.data_dir / SCORES_FILENAME if settings.data_dir else None
        self.scores = ScoreBook()
        """Filled from ``scores_path`` when the node starts running."""
        self._scores_dirty = False
        self.background: trio.Nursery | None = None
        """While the node runs: a nursery for work that should not hold up its caller."""
        self.notes = NoteService(
            self.host,
            identity,
            timeout=settings.request_timeout,
            on_violation=self._violation,
            is_banned=self.is_banned,
        )
        self.dht: DHTNode | None = None
        self.reservations: RelayReservations | None = None
        self.port_forwarding: PortForwarding | None = None
        self.recall = SwarmRecall(self, settings.data_dir)
        self.started_at = time.time()
        self._announce_lock = trio.Lock()

    def _connection_died(self, peer_id: ID) -> None:
        """A connection went silent and was closed: stop asking that peer DHT queries (each
        would wait out the request timeout); it is learnt again when it answers others."""
        if self.dht is not None:
            self.dht.table.remove(peer_id.to_bytes())

    def _violation(self, peer_id: ID, code: RejectCode) -> None:
        key = peer_id.to_base58()
        if key not in self.violations and len(self.violations) >= MAX_VIOLATORS_SHOWN:
            # A diagnostic count, bounded like everything a stranger can add to: the oldest
            # entries go first.
            for old in list(self.violations)[: MAX_VIOLATORS_SHOWN // 10]:
                del self.violations[old]
        self.violations[key] = self.violations.get(key, 0) + 1
        log.info("protocol violation by %s: %s", key, code.name)
        event = SCORE_EVENT_OF.get(code, ScoreEvent.MALFORMED)
        self.record_score(peer_id.to_bytes(), event)

    def record_score(self, peer: bytes, event: ScoreEvent) -> None:
        """Score a peer; a peer falling below the threshold is banned (and persisted)."""
        if self.scores.record(peer, event, time.time()):
            log.warning("banned %s after %s", ID(peer).to_base58(), event.value)
            self.save_scores()
        else:
            self._scores_dirty = True

    def is_banned(self, peer_id: ID) -> bool:
        return self.scores.is_banned(peer_id.to_bytes(), time.time())

    def save_scores(self) -> None:
        self._scores_dirty = False
        if self.scores_path is not None:
            try:
                save_book(self.scores, self.scores_path)
            except OSError as exc:
                log.warning("cannot save peer scores to %s: %s", self.scores_path, exc)

    async def _save_scores_loop(self) -> None:
        while True:
            await trio.sleep(30.0)
            if self._scores_dirty:
                self.save_scores()

    # ---- addresses -------------------------------------------------------------------------

    def listen_addrs(self) -> list[str]:
        """Concrete addresses we listen on (wildcards expanded to interface addresses)."""
        out: list[str] = []
        for listener in self.host.get_network().listeners.values():
            for ma in listener.get_addrs():
                if maddrs.is_unspecified(str(ma)):
                    out.extend(str(a) for a in expand_wildcard_address(ma))
                else:
                    out.append(str(ma))
        return list(dict.fromkeys(out))

    def direct_addrs(self) -> list[str]:
        """Addresses others may dial directly: announced ones, or the listen ones."""
        if self.settings.announce:
            return list(self.settings.announce)
        addrs = self.mapped_addrs + self.listen_addrs()
        non_loopback = [a for a in addrs if not maddrs.is_loopback(a)]
        return list(dict.fromkeys(non_loopback or addrs))

    def public_addrs(self) -> list[str]:
        """What we advertise: direct addresses when reachable, else mapped and circuit ones."""
        circuits = self.reservations.circuit_addrs() if self.reservations else []
        if self.reachable:
            return (self.direct_addrs() + circuits)[:16]
        return (self.mapped_addrs + circuits)[:16]

    def full_addrs(self) -> list[str]:
        me = self.peer_id.to_base58()
        return [maddrs.with_peer_id(a, me) for a in self.public_addrs()]

    # ---- lifecycle ---------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SwarmNode]:
        if self.scores_path is not None:
            self.scores = load_book(self.scores_path)
        self.recall.load()
        if self.settings.frame_budget is not None:
            PROCESS_FRAME_BUDGET.configure(self.settings.frame_budget)
        listen = [multiaddr.Multiaddr(a) for a in self.settings.listen]
        async with (
            self.host.run(listen_addrs=listen),
            background_trio_service(self.relay_protocol),
            background_trio_service(self.hole_punching),
            trio.open_nursery() as nursery,
        ):
            self.background = nursery
            nursery.start_soon(self.upgrades.run)
            nursery.start_soon(self.punch_retries.run)
            nursery.start_soon(self.liveness.run)
            await self._start(nursery)
            try:
                yield self
            finally:
                self.background = None
                nursery.cancel_scope.cancel()
                self.save_scores()

    async def _start(self, nursery: trio.Nursery) -> None:
        self.notes.install()
        if self.settings.relay or self.settings.reachability != "private":
            DialBackService(
                self.host, on_violation=self._violation, is_banned=self.is_banned
            ).install()
        await self._connect_bootstrap()
        if self.settings.reachability == "auto" and not self.settings.relay:
            if self.join_refs:
                self.reachable = await self.check_reachability(self.direct_addrs())
            else:
                log.info("no bootstrap peers: this node seeds the network and must be reachable")
                self.reachable = True
        if self.settings.upnp and not self.reachable:
            if self.settings.reachability == "private":
                log.warning("--upnp ignored: reachability is configured as private")
            else:
                await self._start_port_mapping(nursery)
        self.dht = DHTNode(
            self.host,
            self.identity,
            self.dialer,
            self.validator,
            server=self.reachable,
            self_addrs=lambda: tuple(self.public_addrs()),
            k=self.settings.dht_k,
            replicas=self.settings.dht_replicas,
            rpc_timeout=self.settings.request_timeout,
            on_violation=self._violation,
            is_banned=self.is_banned,
            store_limits=StoreLimits(max_bytes=self.settings.dht_store_bytes),
        )
        self.dht.install()
        await self._bootstrap_dht()
        if not self.settings.relay:
            # Kept also by reachable peers, idle while they are reachable: a port mapping can
            # be lost, and then the peer needs relays again.
            self.reservations = RelayReservations(
                self.host,
                self.relay_transport,
                self.dialer,
                self._relay_candidates,
                self.announce,
                want=lambda: 0 if self.reachable else self.settings.relays_wanted,
                timeout=self.settings.dial_timeout,
            )
            await self.reservations.step()
            nursery.start_soon(self.reservations.run)
        await self.announce()
        nursery.start_soon(self.dht.maintain)
        nursery.start_soon(self._rejoin_loop)
        nursery.start_soon(self._save_scores_loop)
        nursery.start_soon(self.recall.run)

    async def _connect_bootstrap(self) -> None:
        async def one(ref: PeerRef) -> None:
            try:
                await self.dialer.connect(ID(ref.peer_id), ref.addrs)
            except PeerUnavailable as exc:
                log.warning("bootstrap peer unreachable: %s", exc)

        async with trio.open_nursery() as nursery:
            for ref in self.bootstrap_refs:
                nursery.start_soon(one, ref)
        if not self.host.get_network().get_connections():
            await self.recall.reach_remembered()

    async def _bootstrap_dht(self) -> None:
        """Fill the routing table through the join peers; when none of them answers (a
        bootstrap peer can accept a connection and still be dying), through remembered ones."""
        if self.dht is None or not self.recall.has_peers_to_join():
            return
        if self.join_refs and await self.dht.bootstrap(self.join_refs):
            return
        if await self.recall.reach_remembered():
            await self.dht.bootstrap(self.join_refs)

    @property
    def join_refs(self) -> list[PeerRef]:
        """The configured bootstrap peers, and remembered peers that answered when none of
        those did (``net.recall``)."""
        return self.bootstrap_refs + self.recall.fallback

    async def check_reachability(self, addrs: list[str]) -> bool:
        """Ask connected bootstrap peers to dial us back; reachable if any of them can."""
        ask = dial_back_request(addrs)
        if ask is None:
            return False
        for ref in self.join_refs:
            helper = ID(ref.peer_id)
            if not self.dialer.is_connected(helper):
                continue
            try:
                result = await ask_dial_back(
                    self.host, helper, ask, timeout=self.settings.request_timeout
                )
            except PeerUnavailable as exc:
                log.info("dial-back check via %s failed: %s", helper, exc)
                continue
            log.info(
                "dial-back via %s (sees us as %s): reachable at %s",
                helper,
                result.observed_ip,
                list(result.reachable) or "nothing",
            )
            return bool(result.reachable)
        log.info("no bootstrap peer could check our reachability; assuming we are behind NAT")
        return False

    async def _start_port_mapping(self, nursery: trio.Nursery) -> None:
        from dandelion_p2p.net.portmapping import PortForwarding

        self.port_forwarding = PortForwarding(self)
        await nursery.start(self.port_forwarding.run)

    async def _rejoin_loop(self) -> None:
        """If every connection was lost (e.g. the network dropped), or the routing table is
        empty (the first bootstrap query timed out and took its contact with it), join
        through the bootstrap peers again."""
        while True:
            await trio.sleep(self.settings.rejoin_interval)
            if not self.recall.has_peers_to_join():
                continue
            isolated = not self.host.get_network().get_connections()
            lost_table = self.dht is not None and len(self.dht.table) == 0
            if isolated or lost_table:
                log.warning(
                    "%s; rejoining through bootstrap peers",
                    "no connections left" if isolated else "routing table is empty",
                )
                await self._connect_bootstrap()
                await self._bootstrap_dht()
                await self.announce()

    # ---- announcements and lookups --------------------------------------------------------

    def announcement(self) -> PeerAnnouncement:
        roles: list[str] = []
        if self.settings.relay:
            roles.append(ROLE_RELAY)
        if self.reachable:
            roles.append(ROLE_DHT_SERVER)
        return PeerAnnouncement(
            addrs=tuple(self.public_addrs()),
            reachable=self.reachable,
            roles=tuple(roles),
            agent=f"dandelion-p2p/{__version__}",
        )

    async def announce(self) -> None:
        """Publish (or refresh) our peer record, membership and, for relays, the relay list."""
        if self.dht is None:
            return
        async with self._announce_lock:
            value = encode_announcement(self.announcement())
            network = self.settings.network.encode()
            stored = await self.dht.put(
                PEER_NAMESPACE, self.identity.peer_id_bytes, value, ANNOUNCEMENT_TTL
            )
            await self.dht.put(MEMBERS_NAMESPACE, network, value, ANNOUNCEMENT_TTL)
            if self.settings.relay:
                await self.dht.put(RELAYS_NAMESPACE, network, value, ANNOUNCEMENT_TTL)
            log.info(
                "announced %d addresses (stored on %d peers)", len(self.public_addrs()), stored
            )

    async def _relay_candidates(self) -> list[PeerRef]:
        found: list[PeerRef] = list(self.join_refs)
        if self.dht is not None:
            try:
                records = await self.dht.get(RELAYS_NAMESPACE, self.settings.network.encode())
            except DandelionError:
                records = []
            for record in records:
                ann = decode_announcement(record.value)
                direct = tuple(a for a in ann.addrs if not maddrs.is_relayed(a))
                if direct:
                    found.append(PeerRef(peer_id=record.publisher, addrs=direct))
        found.extend(self.recall.relay_refs())
        seen: set[bytes] = set()
        unique = []
        for ref in found:
            if ref.peer_id not in seen:
                seen.add(ref.peer_id)
                unique.append(ref)
        return unique

    async def lookup_peer(self, peer_id: ID) -> PeerAnnouncement:
        """The newest announcement ``peer_id`` published. Raises PeerUnavailable if none."""
        if self.dht is None:
            raise PeerUnavailable("the DHT is not running")
        records = await self.dht.get(PEER_NAMESPACE, peer_id.to_bytes())
        if not records:
            raise PeerUnavailable(f"no record of {peer_id} in the DHT")
        newest = max(records, key=lambda r: r.seq)
        return decode_announcement(newest.value)

    @property
    def records(self) -> RecordStore:
        """The DHT, as the features that store records in it see it.

        Raises:
            PeerUnavailable: the node is not running (yet).
        """
        if self.dht is None:
            raise PeerUnavailable("the DHT is not running")
        return self.dht

    def is_connected(self, peer_id: ID) -> bool:
        return self.dialer.is_connected(peer_id)

    async def connect_peer(self, peer_id: ID, addrs: Sequence[str] = ()) -> None:
        """Connect unless connected: at ``addrs`` when given, else at the addresses the
        peer announced in the DHT.

        Raises:
            PeerUnavailable: the peer has no record, or none of its addresses answered.
        """
        if self.dialer.is_connected(peer_id):
            return
        if not addrs:
            addrs = (await self.lookup_peer(peer_id)).addrs
        await self.dialer.connect(peer_id, addrs)

    async def members(self) -> dict[str, PeerAnnouncement]:
        if self.dht is None:
            return {}
        records = await self.dht.get(MEMBERS_NAMESPACE, self.settings.network.encode())
        out: dict[str, PeerAnnouncement] = {}
        for r in records:
            try:
                out[ID(r.publisher).to_base58()] = decode_announcement(r.value)
            except ProtocolViolation:
                continue
        return out

    async def send_note(self, peer_id: ID, text: str) -> str:
        await self.connect_peer(peer_id)
        receipt = await self.notes.send(peer_id, text)
        return receipt.text

    # ---- status ------------------------------------------------------------------------------

    def connected_peers(self) -> list[dict[str, Any]]:
        out = []
        for peer_id, conns in self.host.get_network().get_connections_map().items():
            transports = [a for c in conns for a in transport_addrs(c, self.peer_id)]
            relayed = bool(conns) and all(
                any(maddrs.is_relayed(a) for a in (str(t) for t in c.get_transport_addresses()))
                for c in conns
            )
            bandwidth = self.link_mbps.get(peer_id.to_bytes())
            out.append(
                {
                    "peer_id": peer_id.to_base58(),
                    "connection": "relayed" if relayed else "direct",
                    "addrs": transports,
                    "bandwidth_mbps": None if bandwidth is None else round(bandwidth, 1),
                }
            )
        return out

    def record_link_rate(self, peer: bytes, nbytes: int, seconds: float) -> None:
        """What a bulk transfer from ``peer`` achieved: kept as a moving average per peer
        (shown in status; transfers too small to say anything are ignored)."""
        if nbytes < MIN_MEASURED_BYTES or seconds <= 0:
            return
        mbps = nbytes * 8 / 1e6 / seconds
        old = self.link_mbps.get(peer)
        self.link_mbps[peer] = mbps if old is None else 0.7 * old + 0.3 * mbps

    def status(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id.to_base58(),
            "version": __version__,
            "network": self.settings.network,
            "relay": self.settings.relay,
            "reachable": self.reachable,
            "dht_mode": "server" if (self.dht and self.dht.server) else "client",
            "listen_addrs": self.listen_addrs(),
            "addrs": self.full_addrs(),
            "mapped_addrs": list(self.mapped_addrs),
            "port_mapping": self.port_forwarding.status() if self.port_forwarding else None,
            "connected_peers": self.connected_peers(),
            "relay_reservations": self.reservations.status() if self.reservations else [],
            "routing_table_size": len(self.dht.table) if self.dht else 0,
            "stored_records": len(self.dht.store) if self.dht else 0,
            "notes_received": [vars(n) for n in self.notes.received],
            "violations": dict(self.violations),
            "scores": [st.to_json() for st in self.scores.snapshot(time.time())],
            "uptime_s": round(time.time() - self.started_at, 1),
        }
