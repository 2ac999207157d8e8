"""The dataset role: grant leases on a run's chunks, take signed receipts, serve chunk bytes.

Protocol logic lives in ``leases.py`` (the lease book) and ``messages.py``; this module moves
them over libp2p streams and runs the lease book's SQLite work off the event loop, one
transaction at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.dataset.chunks import ChunkDir
from dandelion_p2p.dataset.holders import (
    HOLDING_TTL,
    SERVERS_NAMESPACE,
    ServerAnnouncement,
    encode_value,
)
from dandelion_p2p.dataset.leases import Lease, LeaseBook
from dandelion_p2p.dataset.manifest import Manifest, signed_digest, signed_document
from dandelion_p2p.dataset.messages import (
    CHUNK_PROTOCOL,
    DATASET,
    LEASE_PROTOCOL,
    MAX_REQUEST,
    Complete,
    CompleteAck,
    LeaseGrant,
    LeaseRequest,
    NoLease,
)
from dandelion_p2p.dataset.transfer import serve_chunks
from dandelion_p2p.errors import ConfigError, ProtocolViolation
from dandelion_p2p.identity import verify_by_peer
from dandelion_p2p.net.node import SCORE_EVENT_OF, SwarmNode
from dandelion_p2p.net.streams import serve_requests
from dandelion_p2p.reputation.book import ScoreEvent
from dandelion_p2p.runconfig.schema import DatasetConfig
from dandelion_p2p.wire import Message, RejectCode

log = logging.getLogger(__name__)

T = TypeVar("T")
REQUEST_TIMEOUT = 10.0


def violation_sink(node: SwarmNode) -> Callable[[ID, RejectCode], None]:
    """Report a remote peer's protocol violation to the node's score book."""

    def report(peer_id: ID, code: RejectCode) -> None:
        key = peer_id.to_base58()
        node.violations[key] = node.violations.get(key, 0) + 1
        node.record_score(peer_id.to_bytes(), SCORE_EVENT_OF.get(code, ScoreEvent.MALFORMED))

    return report


class DatasetServer:
    """Serves one run's packed dataset from ``dataset_dir`` on ``node``."""

    def __init__(
        self,
        node: SwarmNode,
        run: str,
        manifest: Manifest,
        dataset_dir: Path,
        book: LeaseBook,
        settings: DatasetConfig,
    ) -> None:
        self.node = node
        self.run = run
        self.manifest = manifest
        self.chunks = ChunkDir(dataset_dir)
        self.book = book
        self.settings = settings
        self._names = {c.hash for c in manifest.chunks}
        # Clients fetch the signed manifest by its digest (run config ``[dataset] manifest``)
        # over the chunk protocol, to check every grant against it.
        try:
            self.signed_manifest: bytes | None = signed_document(dataset_dir)
        except ConfigError as exc:
            log.warning("the signed manifest cannot be served: %s", exc)
            self.signed_manifest = None
        self.signed_manifest_digest = (
            signed_digest(self.signed_manifest) if self.signed_manifest is not None else ""
        )
        self._db_lock = trio.Lock()
        self.served_requests = 0
        self.receipts_taken = 0

    @classmethod
    def check_files(cls, manifest: Manifest, dataset_dir: Path) -> None:
        """Raise ``ConfigError`` if a chunk of the manifest is missing or has the wrong size.

        Contents are not hashed here (that can take minutes on a large dataset): every
        receiver hashes what it gets.
        """
        chunks = ChunkDir(dataset_dir)
        for entry in manifest.chunks:
            size = chunks.size_of(entry.hash)
            if size != entry.size:
                state = "missing" if size is None else f"{size} bytes, expected {entry.size}"
                raise ConfigError(f"dataset {dataset_dir}: chunk {entry.hash} is {state}")

    def install(self, *, chunks: bool = True) -> None:
        """Serve the lease protocol and, with ``chunks``, the chunk protocol from our files
        (a daemon that also caches chunks as a client serves both through one handler)."""
        report = violation_sink(self.node)
        host = self.node.host
        host.set_stream_handler(
            TProtocol(LEASE_PROTOCOL),
            serve_requests(
                DATASET,
                self._answer,
                max_request=MAX_REQUEST,
                timeout=REQUEST_TIMEOUT,
                on_violation=report,
                refuse=self.node.is_banned,
            ),
        )
        if chunks:
            host.set_stream_handler(
                TProtocol(CHUNK_PROTOCOL),
                serve_chunks(self.source, on_violation=report, refuse=self.node.is_banned),
            )

    def source(self, name: str) -> Path | bytes | None:
        if name in self._names and self.chunks.has(name):
            return self.chunks.path_of(name)
        if self.signed_manifest is not None and name == self.signed_manifest_digest:
            return self.signed_manifest
        return None

    async def announce(self) -> int:
        """Publish this server in the DHT under the run (kept alive by the DHT)."""
        if self.node.dht is None:
            return 0
        value = encode_value(
            ServerAnnouncement(
                run=self.run,
                manifest=self.manifest.digest,
                chunks=len(self.manifest.chunks),
                samples=self.manifest.samples,
            )
        )
        return await self.node.dht.put(SERVERS_NAMESPACE, self.run.encode(), value, HOLDING_TTL)

    async def _db(self, work: Callable[[], T]) -> T:
        async with self._db_lock:
            return await trio.to_thread.run_sync(work)

    async def _answer(self, peer_id: ID, msg: Message) -> Message:
        self.served_requests += 1
        if isinstance(msg, LeaseRequest):
            return await self._lease(peer_id, msg)
        if isinstance(msg, Complete):
            return await self._complete(peer_id, msg)
        raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, f"{type(msg).__name__} is not a request")

    def _check_run(self, run: str) -> None:
        if run != self.run:
            raise ProtocolViolation(RejectCode.NOT_FOUND, f"run {run[:80]!r} is not served here")

    async def _lease(self, peer_id: ID, msg: LeaseRequest) -> Message:
        self._check_run(msg.run)
        peer = peer_id.to_bytes()
        now = time.time()
        result = await self._db(
            lambda: self.book.grant(
                peer,
                now,
                lease_seconds=self.settings.lease_seconds,
                max_per_peer=self.settings.max_leases_per_peer,
            )
        )
        if not isinstance(result, Lease):
            return NoLease(epoch=result.epoch, retry_after_ms=int(result.retry_after * 1000))
        log.info("leased chunk %s (epoch %d) to %s", result.chunk[:12], result.epoch, peer_id)
        return LeaseGrant(
            run=self.run,
            lease_id=result.id,
            epoch=result.epoch,
            chunk=result.chunk,
            samples=result.samples,
            size=result.size,
            expires_in_ms=max(1, int((result.expires_at - now) * 1000)),
        )

    async def _complete(self, peer_id: ID, msg: Complete) -> Message:
        receipt = msg.receipt
        self._check_run(receipt.run)
        if receipt.peer != peer_id.to_bytes():
            raise ProtocolViolation(RejectCode.FORBIDDEN, "receipt names another peer")
        if not verify_by_peer(receipt.peer, receipt.payload(), receipt.signature):
            raise ProtocolViolation(RejectCode.BAD_SIGNATURE, "receipt is not signed by its peer")
        now = time.time()
        outcome = await self._db(
            lambda: self.book.record_receipt(
                lease_id=receipt.lease_id,
                epoch=receipt.epoch,
                chunk=receipt.chunk,
                peer=receipt.peer,
                samples=receipt.samples,
                signature=receipt.signature,
                now=now,
            )
        )
        if not outcome.duplicate:
            self.receipts_taken += 1
            log.info(
                "receipt from %s for chunk %s: epoch %d has %d/%d",
                peer_id, receipt.chunk[:12], outcome.epoch, outcome.completed, outcome.total,
            )
        return CompleteAck(epoch=outcome.epoch, completed=outcome.completed, total=outcome.total)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "role": "server",
            "run": self.run,
            "manifest": self.manifest.digest,
            "signed_manifest": self.signed_manifest_digest,
            "samples": self.manifest.samples,
            "bytes": self.manifest.size,
        }
        status.update(self.book.status(time.time()))
        return status
