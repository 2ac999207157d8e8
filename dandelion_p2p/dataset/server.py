"""The dataset role: grant leases on a run's chunks, take signed receipts, serve chunk bytes.

What to answer is decided by ``lease_protocol.LeaseDesk`` (over the lease book) and
``chunk_protocol``; this module moves their messages over libp2p streams and runs the desk's
SQLite work off the event loop, one request at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.dataset.chunks import ChunkDir
from dandelion_p2p.dataset.holders import (
    HOLDING_TTL,
    SERVERS_NAMESPACE,
    ServerAnnouncement,
    encode_value,
)
from dandelion_p2p.dataset.lease_protocol import LeaseDesk
from dandelion_p2p.dataset.leases import MAX_LEASES_PER_NETWORK, LeaseBook
from dandelion_p2p.dataset.manifest import Manifest, signed_digest, signed_document
from dandelion_p2p.dataset.messages import CHUNK_PROTOCOL, DATASET, LEASE_PROTOCOL, MAX_REQUEST
from dandelion_p2p.dataset.ports import PeerScores, RecordStore
from dandelion_p2p.dataset.transfer import serve_chunks
from dandelion_p2p.errors import ConfigError, RejectCode
from dandelion_p2p.net.origin import peer_network
from dandelion_p2p.net.streams import serve_requests
from dandelion_p2p.reputation.book import SCORE_EVENT_OF, ScoreEvent
from dandelion_p2p.runconfig.admission import NOT_ADMITTED, AdmissionConfig
from dandelion_p2p.runconfig.schema import DatasetConfig
from dandelion_p2p.wire import Message

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0


def violation_sink(scores: PeerScores) -> Callable[[ID, RejectCode], None]:
    """Report a remote peer's protocol violation: counted, and scored in the node's book."""

    def report(peer_id: ID, code: RejectCode) -> None:
        key = peer_id.to_base58()
        scores.violations[key] = scores.violations.get(key, 0) + 1
        scores.record_score(peer_id.to_bytes(), SCORE_EVENT_OF.get(code, ScoreEvent.MALFORMED))

    return report


class DatasetServer:
    """Serves one run's packed dataset from ``dataset_dir`` over ``host``, announced in
    ``records`` (the DHT); ``scores`` counts and scores the peers that break the protocols,
    and refuses the banned."""

    def __init__(
        self,
        run: str,
        manifest: Manifest,
        dataset_dir: Path,
        book: LeaseBook,
        settings: DatasetConfig,
        *,
        host: IHost,
        records: RecordStore,
        scores: PeerScores,
        max_leases_per_network: int = MAX_LEASES_PER_NETWORK,
        admission: AdmissionConfig | None = None,
    ) -> None:
        """``admission``: a closed run's admitted peers, the only ones whose lease and chunk
        requests are answered (others get FORBIDDEN unread); None or empty: anyone's."""
        self.host = host
        self.admission = admission or AdmissionConfig()
        self.records = records
        self.scores = scores
        self.run = run
        self.manifest = manifest
        self.chunks = ChunkDir(dataset_dir)
        self.book = book
        self.settings = settings
        # A receipt proves its signer holds the chunk's bytes (however it got them): the desk
        # checks the proof against our own copy.
        self.desk = LeaseDesk(run, book, settings, chunk_path=self.chunks.path_of,
                              max_leases_per_network=max_leases_per_network)
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
        self._desk_lock = trio.Lock()

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
        report = violation_sink(self.scores)
        self.host.set_stream_handler(
            TProtocol(LEASE_PROTOCOL),
            serve_requests(
                DATASET,
                self._answer,
                max_request=MAX_REQUEST,
                timeout=REQUEST_TIMEOUT,
                on_violation=report,
                refuse=self._refused,
            ),
        )
        if chunks:
            self.host.set_stream_handler(
                TProtocol(CHUNK_PROTOCOL),
                serve_chunks(
                    self.source,
                    on_violation=report,
                    refuse=self._refused,
                ),
            )

    def _refused(self, peer: ID) -> bool | str:
        if self.scores.is_banned(peer):
            return True
        return not self.admission.admits(peer.to_bytes()) and NOT_ADMITTED

    def source(self, name: str) -> Path | bytes | None:
        if name in self._names and self.chunks.has(name):
            return self.chunks.path_of(name)
        if self.signed_manifest is not None and name == self.signed_manifest_digest:
            return self.signed_manifest
        return None

    async def announce(self) -> int:
        """Publish this server in the DHT under the run (kept alive by the DHT); returns how
        many peers stored it."""
        value = encode_value(
            ServerAnnouncement(
                run=self.run,
                manifest=self.manifest.digest,
                chunks=len(self.manifest.chunks),
                samples=self.manifest.samples,
            )
        )
        return await self.records.put(SERVERS_NAMESPACE, self.run.encode(), value, HOLDING_TTL)

    @property
    def served_requests(self) -> int:
        return self.desk.served_requests

    @property
    def receipts_taken(self) -> int:
        return self.desk.receipts_taken

    async def _answer(self, peer_id: ID, msg: Message) -> Message:
        peer = peer_id.to_bytes()
        network = self._network_of(peer_id)
        # The desk commits each grant and receipt to SQLite before answering: a thread's work,
        # one request at a time (the book is one connection).
        async with self._desk_lock:
            return await trio.to_thread.run_sync(
                self.desk.answer, peer, msg, time.time(), network
            )

    def _network_of(self, peer_id: ID) -> str:
        """The network of the address ``peer_id`` is connected from directly, or
        ``UNKNOWN_NETWORK`` (relayed: the address we see is the relay's)."""
        return peer_network(self.host, peer_id, direct_only=True)

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
