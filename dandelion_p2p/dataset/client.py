"""What a training peer uses: lease chunks, fetch them from any holder, hand in receipts.

``DatasetClient(run, cache_dir, host=, signer=, records=, links=, scores=)``, over the
node's narrow ports (``dataset.ports``):

* ``await lease()`` -> ``LeaseGrant``: from a dataset server of the run (found in the DHT, or
  given), waiting while every chunk of the epoch is out;
* ``await fetch(chunk)`` -> verified bytes, also kept in ``cache_dir`` (``path(chunk)``) and
  announced in the DHT so other peers fetch from here rather than from the servers;
* ``await complete(lease)``: a receipt signed with this peer's key.

A holder that sends bytes not matching the hash is scored down and the next holder is asked.

When the run config names its manifest (``[dataset] manifest``, set ``expected_manifest``),
the client fetches that signed manifest by its digest, checks it is signed by the run's
owner, takes leases only from servers announcing it and refuses any grant of a chunk the
manifest does not list: a peer announcing itself as a server of someone else's run gets
nowhere.
"""

from __future__ import annotations

import logging
import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import overload

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.dataset.chunk_protocol import LargerThanExpected
from dandelion_p2p.dataset.chunks import ChunkDir, check_chunk_name, chunk_hash, possession_proof
from dandelion_p2p.dataset.holders import (
    CHUNK_NAMESPACE,
    HOLDING_TTL,
    SERVERS_NAMESPACE,
    ChunkHolding,
    chunk_key,
    decode_holding,
    decode_server,
    encode_value,
)
from dandelion_p2p.dataset.lease_protocol import LeaseRound, manifest_of_run, receipt_for
from dandelion_p2p.dataset.manifest import ChunkEntry, Manifest
from dandelion_p2p.dataset.messages import (
    CHUNK_PROTOCOL,
    DATASET,
    LEASE_PROTOCOL,
    MAX_REPLY,
    Complete,
    CompleteAck,
    LeaseGrant,
    LeaseRequest,
    NoLease,
    Receipt,
)
from dandelion_p2p.dataset.ports import PeerConnector, PeerScores, RecordStore, Signer
from dandelion_p2p.dataset.server import violation_sink
from dandelion_p2p.dataset.transfer import fetch_chunk, serve_chunks
from dandelion_p2p.errors import (
    DandelionError,
    PeerUnavailable,
    ProtocolViolation,
    RejectCode,
    RemoteRejected,
)
from dandelion_p2p.net.dht.messages import PeerRef
from dandelion_p2p.net.streams import request
from dandelion_p2p.reputation.book import ScoreEvent
from dandelion_p2p.runconfig.admission import NOT_ADMITTED
from dandelion_p2p.wire import Message

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0
"""Seconds a lease or receipt exchange may take before the next server is asked."""
DHT_TIMEOUT = 5.0
DISCOVERY_INTERVAL = 30.0
"""Seconds between two DHT lookups of the run's servers while a known one answers."""
DEFAULT_MAX_CACHED = 16


def _lease_key(lease: LeaseGrant) -> tuple[int, str, int, bytes]:
    return lease.lease_id, lease.chunk, lease.epoch, lease.nonce


class DatasetClient:
    """A training peer's view of one run's dataset: its servers, leases and chunks.

    Streams go over ``host``; ``signer`` signs receipts; ``records`` (the DHT) says who
    serves the run and who holds a chunk; ``links`` connects to them; ``scores`` scores the
    holders and servers and counts their violations, and no banned peer is asked.
    """

    def __init__(
        self,
        run: str,
        cache_dir: Path,
        *,
        host: IHost,
        signer: Signer,
        records: RecordStore,
        links: PeerConnector,
        scores: PeerScores,
        servers: Sequence[PeerRef] = (),
        max_cached: int = DEFAULT_MAX_CACHED,
        announce_holdings: bool = True,
        request_timeout: float = REQUEST_TIMEOUT,
        expected_manifest: str = "",
    ) -> None:
        self.host = host
        self.signer = signer
        self.records = records
        self.links = links
        self.scores = scores
        self.run = run
        self.cache = ChunkDir(cache_dir)
        self.known_servers: dict[bytes, tuple[str, ...]] = {s.peer_id: s.addrs for s in servers}
        self.max_cached = max_cached
        self.announce_holdings = announce_holdings
        self.request_timeout = request_timeout
        # Chunks verified in this process, least recently used first: only these are served.
        # Files left from an earlier run are checked again when first used.
        self._cached: OrderedDict[str, None] = OrderedDict()
        self._granted_by: dict[tuple[int, str, int, bytes], list[bytes]] = {}
        """Open leases (lease id, chunk, epoch, nonce) -> the server that granted it.
        Servers of a run number their leases independently and hand out chunks in the same
        order, so two of them may well grant "lease 1, chunk X, epoch 0"; the nonce tells
        them apart, and a receipt's possession proof is good only where its nonce came
        from."""
        self._preferred: bytes | None = None
        self._discovered: list[bytes] = []
        self._discovered_at = -math.inf
        self.rejected_holders: list[tuple[str, str]] = []
        """(peer id, reason) of every holder whose chunk failed verification."""
        self.expected_manifest = expected_manifest
        """Digest of the signed manifest the run config names; "" trusts any server."""
        self.manifest: Manifest | None = None
        self._manifest_digest = ""
        self._entries: dict[str, ChunkEntry] = {}
        self._announced: dict[bytes, str] = {}
        self.admitted: frozenset[bytes] | None = None
        """A closed run's peers and its owner (None: an open run): the only dataset servers
        and chunk holders taken, and the only peers the run's cached chunks are served to.
        Holdings of a closed run are not announced (the DHT would show its chunk names to
        anyone)."""
        self._warned_unverified = False

    # ---- serving what we hold ------------------------------------------------------------

    def install(self) -> None:
        """Serve cached chunks to other peers (skip on a node that runs a dataset server)."""
        report = violation_sink(self.scores)
        self.host.set_stream_handler(
            TProtocol(CHUNK_PROTOCOL),
            serve_chunks(self.source, on_violation=report, refuse=self.scores.is_banned,
                         refuse_chunk=self._refuse_chunk),
        )

    def _refuse_chunk(self, peer: ID, name: str) -> str | None:
        return None if self.may_serve(peer.to_bytes()) else NOT_ADMITTED

    def source(self, name: str) -> Path | None:
        return self.cache.path_of(name) if name in self._cached and self.cache.has(name) else None

    def path(self, name: str) -> Path | None:
        return self.source(name)

    def cached(self) -> list[str]:
        return list(self._cached)

    def granted_by(self, lease: LeaseGrant) -> bytes | None:
        """The server that granted an open lease (where its receipt goes)."""
        servers = self._granted_by.get(_lease_key(lease))
        return servers[-1] if servers else None

    def _forget_grant(self, lease: LeaseGrant, server: bytes) -> None:
        key = _lease_key(lease)
        servers = self._granted_by.get(key, [])
        if server in servers:
            servers.remove(server)
        if not servers:
            self._granted_by.pop(key, None)

    # ---- finding peers -------------------------------------------------------------------

    async def servers(self, *, refresh: bool = False) -> list[bytes]:
        """Dataset servers of the run: given ones, then those announced in the DHT.

        The DHT is asked at most every ``DISCOVERY_INTERVAL`` seconds unless ``refresh``; the
        server that last answered comes first.
        """
        now = trio.current_time()
        if refresh or now - self._discovered_at >= DISCOVERY_INTERVAL:
            self._discovered_at = now
            try:
                records = await self.records.get(
                    SERVERS_NAMESPACE, self.run.encode(), timeout=DHT_TIMEOUT
                )
            except DandelionError as exc:
                log.info("looking up dataset servers of %s failed: %s", self.run, exc)
                records = []
            found = []
            for record in records:
                try:
                    announcement = decode_server(record.value)
                except ProtocolViolation:
                    continue
                if announcement.run == self.run:
                    found.append(record.publisher)
                    self._announced[record.publisher] = announcement.manifest
            if found:
                self._discovered = found
        discovered = self._discovered
        if self.manifest is not None:
            digest = self.manifest.digest
            skipped = [p for p in discovered if self._announced.get(p) != digest]
            if skipped:
                log.debug("skipping %d servers of %s announcing another manifest",
                          len(skipped), self.run)
            discovered = [p for p in discovered if self._announced.get(p) == digest]
        servers = list(dict.fromkeys([*self.known_servers, *discovered]))
        if self.admitted is not None:
            listed = [p for p in servers if p in self.admitted]
            if servers and not listed:
                log.warning("run %s is closed and none of its %d dataset servers is its owner "
                            "or an admitted peer: a server run for the owner must be listed",
                            self.run, len(servers))
            servers = listed
        if self._preferred in servers:
            servers.remove(self._preferred)
            servers.insert(0, self._preferred)  # type: ignore[arg-type]
        return servers

    async def holders(self, name: str) -> list[bytes]:
        """Peers announcing a copy of chunk ``name`` (not servers, not us), in random order."""
        try:
            records = await self.records.get(
                CHUNK_NAMESPACE, chunk_key(name), timeout=DHT_TIMEOUT
            )
        except DandelionError:
            return []
        me = self.signer.peer_id_bytes
        out = []
        for record in records:
            try:
                holding = decode_holding(record.value)
            except ProtocolViolation:
                continue
            if holding.chunk == name and record.publisher != me and self.may_serve(
                record.publisher
            ):
                out.append(record.publisher)
        random.shuffle(out)
        return out

    async def _connect(self, peer: bytes) -> None:
        peer_id = ID(peer)
        if self.links.is_connected(peer_id):
            return
        # py-libp2p refuses for 60 s to dial a peer whose addresses all failed once; a
        # dataset server that restarts is back within seconds, and the dialer keeps its own
        # (short) backoff anyway.
        unblock = getattr(self.host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(peer_id)
        await self.links.connect_peer(peer_id, self.known_servers.get(peer, ()))

    async def _ask(self, peer: bytes, msg: Message) -> Message:
        await self._connect(peer)
        try:
            return await request(
                self.host, ID(peer), LEASE_PROTOCOL, msg, DATASET,
                max_reply=MAX_REPLY, timeout=self.request_timeout,
            )
        except ProtocolViolation as exc:
            violation_sink(self.scores)(ID(peer), exc.code)
            raise

    # ---- the manifest --------------------------------------------------------------------

    async def verified_manifest(self) -> Manifest | None:
        """The run's signed manifest named by the run config, fetched and checked once.

        None when the run config names no manifest (any announced server is trusted then).

        Raises:
            PeerUnavailable: no server delivered a manifest with that digest signed by the
                run's owner.
        """
        digest = self.expected_manifest
        if not digest:
            if not self._warned_unverified:
                self._warned_unverified = True
                log.warning("run %s names no dataset manifest in its config: leases are taken "
                            "from any peer announcing itself as its server", self.run)
            return None
        if self.manifest is not None and self._manifest_digest == digest:
            return self.manifest
        self.manifest, self._entries = None, {}
        servers = await self.servers(refresh=True)
        errors: list[str] = []
        for peer in servers:
            peer_id = ID(peer)
            if self.scores.is_banned(peer_id):
                continue
            try:
                await self._connect(peer)
                raw = await fetch_chunk(self.host, peer_id, digest)
                manifest = manifest_of_run(raw, digest, self.run)
            except ProtocolViolation as exc:
                violation_sink(self.scores)(peer_id, exc.code)
                errors.append(f"{peer_id}: {exc}")
                continue
            except (PeerUnavailable, RemoteRejected) as exc:
                errors.append(f"{peer_id}: {exc}")
                continue
            self.manifest, self._manifest_digest = manifest, digest
            self._entries = {c.hash: c for c in manifest.chunks}
            log.info("run %s: verified manifest %s (%d chunks)", self.run, digest[:12],
                     len(manifest.chunks))
            return manifest
        self._discovered_at = -math.inf
        raise PeerUnavailable(
            f"no server of {self.run} delivered its manifest {digest[:12]}: "
            + ("; ".join(errors) or "no server known")[:500]
        )

    # ---- leases --------------------------------------------------------------------------

    async def try_lease(self) -> LeaseGrant | NoLease:
        """One round over the run's servers; the first valid grant wins.

        Every server is asked before a ``NoLease`` or a refusal is believed, so one server
        that says "nothing free" (truthfully or not) does not stall training.

        Raises:
            PeerUnavailable: no server answered (or the run's manifest could not be had).
            RemoteRejected: every answering server refused (e.g. ``RATE_LIMITED``).
        """
        await self.verified_manifest()
        servers = await self.servers()
        if not servers:
            servers = await self.servers(refresh=True)
        if not servers:
            raise PeerUnavailable(f"no dataset server of {self.run} is known")
        lease_round = LeaseRound(self.run, self._entries if self.manifest is not None else None)
        for server in servers:
            try:
                reply = await self._ask(server, LeaseRequest(run=self.run))
            except (PeerUnavailable, ProtocolViolation, RemoteRejected) as exc:
                lease_round.failed(server, exc)
                continue
            try:
                grant = lease_round.answered(server, reply)
            except ProtocolViolation as exc:
                log.warning("refused a lease from %s: %s", ID(server), exc.detail)
                violation_sink(self.scores)(ID(server), exc.code)
                continue
            if grant is not None:
                self._granted_by.setdefault(_lease_key(grant), []).append(server)
                self._preferred = server
                return grant
        try:
            return lease_round.outcome()
        except PeerUnavailable:
            # Every server we knew failed: look for others next time.
            self._discovered_at = -math.inf
            raise

    @overload
    async def lease(self) -> LeaseGrant: ...

    @overload
    async def lease(self, wait: float) -> LeaseGrant | None: ...

    async def lease(self, wait: float = math.inf) -> LeaseGrant | None:
        """A lease, waiting (as the server advises) while every chunk is out; ``None`` once
        ``wait`` seconds passed without one. A request under way is never cut short, so no
        grant is lost to the deadline.

        Raises ``PeerUnavailable`` when no server answers.
        """
        deadline = trio.current_time() + wait
        while True:
            reply = await self.try_lease()
            if isinstance(reply, LeaseGrant):
                return reply
            left = deadline - trio.current_time()
            if left <= 0:
                return None
            await trio.sleep(min(left, max(0.2, reply.retry_after_ms / 1000)))

    async def receipt(self, lease: LeaseGrant, samples: int | None = None) -> Receipt:
        """Our signed receipt for ``lease``, its possession proof computed from the chunk's
        verified bytes, wherever they came from (fetched again if no longer cached)."""
        data = await self.fetch(lease.chunk, expected_size=lease.size)
        possession = await trio.to_thread.run_sync(possession_proof, lease.nonce, data)
        return receipt_for(lease, self.signer.peer_id_bytes, self.signer.sign, possession,
                           samples)

    async def complete(
        self, lease: LeaseGrant, samples: int | None = None, *, attempts: int = 20,
        retry_delay: float = 0.5,
    ) -> CompleteAck:
        """Hand in a signed receipt for ``lease`` to the server that granted it.

        Retries while that server is unreachable (it may be restarting). A receipt the
        server already holds is acknowledged again, so retrying is always safe. The receipt
        proves possession of the chunk's bytes however we got them (from a holder, our cache
        or a server); only the granting server knows the nonce it is proved with.

        Raises:
            PeerUnavailable: the server stayed unreachable for every attempt.
            RemoteRejected: refused, e.g. ``STALE`` (the lease expired and someone else
                completed the chunk first).
        """
        candidates = list(reversed(self._granted_by.get(_lease_key(lease), [])))
        if not candidates:
            servers = await self.servers()
            if not servers:
                raise PeerUnavailable(f"no dataset server of {self.run} is known")
            candidates = servers[:1]
        message = Complete(receipt=await self.receipt(lease, samples))
        for attempt in range(attempts):
            for server in candidates:
                try:
                    reply = await self._ask(server, message)
                except PeerUnavailable as exc:
                    if attempt + 1 == attempts and server == candidates[-1]:
                        raise
                    log.info("receipt for lease %d not delivered to %s (%s)", lease.lease_id,
                             ID(server), exc)
                    continue
                if not isinstance(reply, CompleteAck):
                    raise ProtocolViolation(RejectCode.UNEXPECTED, "expected CompleteAck")
                self._forget_grant(lease, server)
                return reply
            await trio.sleep(retry_delay)
        raise AssertionError("unreachable")

    # ---- chunks --------------------------------------------------------------------------

    async def fetch(self, name: str, *, expected_size: int | None = None) -> bytes:
        """Verified bytes of chunk ``name``: from the cache, other holders, then servers.

        Raises:
            PeerUnavailable: no holder delivered a chunk with the right hash.
        """
        check_chunk_name(name)
        if self.cache.has(name):
            data = await trio.Path(self.cache.path_of(name)).read_bytes()
            if self._matches(name, data):
                if name not in self._cached:
                    await self._keep(name, data, write=False)
                self._cached.move_to_end(name)
                return data
            log.warning("cached chunk %s is corrupt; fetching it again", name[:12])
            self._drop(name)
        entry = self._entries.get(name)
        # The signed manifest's size is authoritative; a caller's may simply be wrong, and a
        # holder is not to blame for disagreeing with it.
        trusted_size = entry is not None
        if entry is not None:
            expected_size = entry.size
        servers = await self.servers()
        random.shuffle(servers)
        candidates = [h for h in await self.holders(name) if h not in servers] + servers
        errors: list[str] = []
        for peer in candidates:
            peer_id = ID(peer)
            if self.scores.is_banned(peer_id):
                continue
            try:
                await self._connect(peer)
                data = await fetch_chunk(self.host, peer_id, name,
                                         expected_size=expected_size)
            except LargerThanExpected as exc:
                if trusted_size:
                    self.rejected_holders.append((peer_id.to_base58(), str(exc)))
                    violation_sink(self.scores)(peer_id, exc.code)
                errors.append(f"{peer_id}: {exc}")
                continue
            except ProtocolViolation as exc:
                log.warning("rejected chunk %s from %s: %s", name[:12], peer_id, exc)
                self.rejected_holders.append((peer_id.to_base58(), str(exc)))
                violation_sink(self.scores)(peer_id, exc.code)
                errors.append(f"{peer_id}: {exc}")
                continue
            except (PeerUnavailable, RemoteRejected) as exc:
                errors.append(f"{peer_id}: {exc}")
                continue
            self.scores.record_score(peer, ScoreEvent.SUCCESS)
            await self._keep(name, data)
            return data
        raise PeerUnavailable(
            f"chunk {name[:12]} could not be fetched: " + ("; ".join(errors) or "no holder")[:500]
        )

    @staticmethod
    def _matches(name: str, data: bytes) -> bool:
        return chunk_hash(data) == name

    async def _keep(self, name: str, data: bytes, *, write: bool = True) -> None:
        if write:
            await trio.to_thread.run_sync(self.cache.write, name, data)
        self._cached[name] = None
        self._cached.move_to_end(name)
        while len(self._cached) > self.max_cached:
            oldest, _ = self._cached.popitem(last=False)
            self._drop(oldest)
        if self.announce_holdings and self.admitted is None:
            value = encode_value(ChunkHolding(chunk=name, size=len(data)))
            try:
                await self.records.put(CHUNK_NAMESPACE, chunk_key(name), value, HOLDING_TTL)
            except DandelionError as exc:
                log.info("announcing chunk %s failed: %s", name[:12], exc)

    def restrict_to(self, admitted: frozenset[bytes] | None) -> None:
        """Take a closed run's peers (and owner) as ``admitted``: holdings announced while
        the run was not known to be closed are withdrawn."""
        if admitted is not None and self.admitted is None:
            for name in self._cached:
                self.records.unpublish(CHUNK_NAMESPACE, chunk_key(name))
        self.admitted = admitted

    def may_serve(self, peer: bytes) -> bool:
        """Whether ``peer`` may have this run's chunks from us (and serve them to us)."""
        return self.admitted is None or peer in self.admitted

    def _drop(self, name: str) -> None:
        self._cached.pop(name, None)
        self.cache.remove(name)
        self.records.unpublish(CHUNK_NAMESPACE, chunk_key(name))
