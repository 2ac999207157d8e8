"""The lease protocol without I/O (spec: protocol/dataset.md section 2).

The server's end is ``LeaseDesk``: a request and the peer it came from in, the reply out, or
the ``ProtocolViolation`` whose code the peer gets; every grant and receipt is committed to the
``LeaseBook`` (SQLite on local disk) before the reply exists. ``server.DatasetServer`` runs it
behind a libp2p stream handler, off the event loop.

The client's end: ``manifest_of_run`` checks a fetched manifest against the run,
``LeaseRound`` turns the answers of one round over the run's servers into the one outcome the
client acts on, and ``receipt_for`` builds the signed receipt of a lease.
``client.DatasetClient`` does the asking.

Times are Unix seconds passed in by the caller.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from dandelion_p2p.dataset.chunks import file_possession_proof
from dandelion_p2p.dataset.leases import (
    MAX_LEASES_PER_NETWORK,
    Lease,
    LeaseBook,
)
from dandelion_p2p.dataset.manifest import (
    ChunkEntry,
    Manifest,
    parse_signed_document,
    signed_digest,
)
from dandelion_p2p.dataset.messages import (
    Complete,
    CompleteAck,
    LeaseGrant,
    LeaseRequest,
    NoLease,
    Receipt,
)
from dandelion_p2p.errors import (
    ConfigError,
    PeerUnavailable,
    ProtocolViolation,
    RejectCode,
    RemoteRejected,
)
from dandelion_p2p.identity import PeerId, verify_by_peer
from dandelion_p2p.networks import UNKNOWN_NETWORK
from dandelion_p2p.runconfig.publication import derive_run_id, run_name_of
from dandelion_p2p.runconfig.schema import DatasetConfig
from dandelion_p2p.wire import Message

log = logging.getLogger(__name__)

MAX_SHOWN_FAILURES = 500
"""Characters of the servers' failures kept in the error of a round that got nothing."""


class LeaseDesk:
    """The lease protocol as one run's dataset server answers it.

    Not thread-safe: the caller runs one ``answer`` at a time (the book is one SQLite
    connection).
    """

    def __init__(
        self, run: str, book: LeaseBook, settings: DatasetConfig, *,
        max_leases_per_network: int = MAX_LEASES_PER_NETWORK,
        chunk_path: Callable[[str], Path] | None = None,
    ) -> None:
        self.run = run
        self.book = book
        self.settings = settings
        self.max_leases_per_network = max_leases_per_network
        # Where the desk reads a chunk to check a receipt's possession proof. None: proofs
        # are not checked (a desk without the chunks); a dataset server passes its files.
        self.chunk_path = chunk_path
        self.served_requests = 0
        self.receipts_taken = 0

    def answer(
        self, peer: bytes, msg: Message, now: float, network: str = UNKNOWN_NETWORK
    ) -> LeaseGrant | NoLease | CompleteAck:
        """The reply to request ``msg`` from the connected ``peer`` (binary peer id), whose
        address lies in ``network`` (``networks.network_of``).

        Raises ``ProtocolViolation`` with the code dataset.md section 2.2 gives, in its order
        of checks: ``UNKNOWN_TYPE``, ``NOT_FOUND`` (another run, or no such lease),
        ``RATE_LIMITED`` (per peer, then per network), ``FORBIDDEN``, ``BAD_SIGNATURE``,
        ``INVALID_FIELD`` (also for a wrong possession proof and for more samples than the
        chunk has), ``STALE``. Checking a proof reads and hashes the chunk: call from a
        worker thread.
        """
        self.served_requests += 1
        if isinstance(msg, LeaseRequest):
            return self._lease(peer, msg, now, network)
        if isinstance(msg, Complete):
            return self._complete(peer, msg, now)
        raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, f"{type(msg).__name__} is not a request")

    def _check_run(self, run: str) -> None:
        if run != self.run:
            raise ProtocolViolation(RejectCode.NOT_FOUND, f"run {run[:80]!r} is not served here")

    def _lease(
        self, peer: bytes, msg: LeaseRequest, now: float, network: str
    ) -> LeaseGrant | NoLease:
        self._check_run(msg.run)
        result = self.book.grant(
            peer,
            now,
            lease_seconds=self.settings.lease_seconds,
            max_per_peer=self.settings.max_leases_per_peer,
            network=network,
            max_per_network=self.max_leases_per_network,
        )
        if not isinstance(result, Lease):
            return NoLease(epoch=result.epoch, retry_after_ms=int(result.retry_after * 1000))
        log.info("leased chunk %s (epoch %d) to %s", result.chunk[:12], result.epoch,
                 PeerId(peer))
        return LeaseGrant(
            run=self.run,
            lease_id=result.id,
            epoch=result.epoch,
            chunk=result.chunk,
            samples=result.samples,
            size=result.size,
            expires_in_ms=max(1, int((result.expires_at - now) * 1000)),
            nonce=result.nonce or b"",
        )

    def _complete(self, peer: bytes, msg: Complete, now: float) -> CompleteAck:
        receipt = msg.receipt
        self._check_run(receipt.run)
        if receipt.peer != peer:
            raise ProtocolViolation(RejectCode.FORBIDDEN, "receipt names another peer")
        if not verify_by_peer(receipt.peer, receipt.signed_bytes(), receipt.signature):
            raise ProtocolViolation(RejectCode.BAD_SIGNATURE, "receipt is not signed by its peer")
        if self.chunk_path is not None:
            self._check_possession(peer, receipt, self.chunk_path)
        outcome = self.book.record_receipt(
            lease_id=receipt.lease_id,
            epoch=receipt.epoch,
            chunk=receipt.chunk,
            peer=receipt.peer,
            samples=receipt.samples,
            signature=receipt.signature,
            now=now,
        )
        if not outcome.duplicate:
            self.receipts_taken += 1
            log.info(
                "receipt from %s for chunk %s: epoch %d has %d/%d",
                PeerId(peer), receipt.chunk[:12], outcome.epoch, outcome.completed,
                outcome.total,
            )
        return CompleteAck(epoch=outcome.epoch, completed=outcome.completed, total=outcome.total)

    def _check_possession(
        self, peer: bytes, receipt: Receipt, chunk_path: Callable[[str], Path]
    ) -> None:
        """Refuse (``INVALID_FIELD``) a receipt whose possession proof is not the keyed hash
        of the chunk under its lease's nonce: its signer does not hold the bytes."""
        lease = self.book.lease(receipt.lease_id)
        # Only the signer's own lease of that chunk is worth reading a chunk for; the book
        # refuses every other receipt with its own code. A lease granted before leases had
        # nonces has nothing to check against.
        if (lease is None or lease.peer != peer or lease.chunk != receipt.chunk
                or lease.nonce is None):
            return
        # The same signed receipt again (its acknowledgement was lost): proven when recorded,
        # and resending it must not make us hash the chunk once more.
        if self.book.receipt_signature(lease.id) == receipt.signature:
            return
        expected = file_possession_proof(lease.nonce, chunk_path(receipt.chunk))
        if not hmac.compare_digest(expected, receipt.possession):
            raise ProtocolViolation(
                RejectCode.INVALID_FIELD,
                f"possession proof for chunk {receipt.chunk[:12]} does not match its bytes",
            )


# ---- the client's end ------------------------------------------------------------------------


def manifest_of_run(raw: bytes, digest: str, run: str) -> Manifest:
    """The signed manifest ``raw``, fetched by ``digest`` for ``run`` (section 2.4, rule 1).

    Raises ``ProtocolViolation(INVALID_FIELD)`` (the server that sent it is to blame) unless
    ``raw`` has that digest, is a manifest signed by its owner, and that owner owns ``run``.
    """
    if signed_digest(raw) != digest:  # the transfer checked it; this guards a refactor
        raise ProtocolViolation(RejectCode.INVALID_FIELD, "manifest digest differs")
    try:
        manifest = parse_signed_document(raw)
        owner = PeerId.from_base58(manifest.owner)
        if derive_run_id(owner, run_name_of(run)) != run:
            raise ConfigError(f"manifest is signed by {manifest.owner}, not the run's owner")
    except ConfigError as exc:
        raise ProtocolViolation(RejectCode.INVALID_FIELD, str(exc)) from None
    return manifest


def grant_problem(grant: LeaseGrant, run: str, entries: Mapping[str, ChunkEntry] | None) -> str:
    """Why ``grant`` is not one of ``run``'s chunks ("" when it is, or nothing to check it
    against: ``entries`` is the manifest's chunks by name, None when the run names none)."""
    if grant.run != run:
        return f"a grant for run {grant.run[:80]!r}"
    if entries is None:
        return ""
    entry = entries.get(grant.chunk)
    if entry is None:
        return f"chunk {grant.chunk[:12]} is not in the run's manifest"
    if (entry.samples, entry.size) != (grant.samples, grant.size):
        return f"chunk {grant.chunk[:12]} has other samples or size in the manifest"
    return ""


class LeaseRound:
    """One round of asking a run's servers for a lease (section 2.4).

    The first valid grant wins. A ``NoLease`` or a refusal is believed only once every server
    was asked, so one server that says "nothing free" (truthfully or not) does not stall
    training: ``outcome`` then gives the soonest ``NoLease``, else the first refusal.
    """

    def __init__(self, run: str, entries: Mapping[str, ChunkEntry] | None) -> None:
        self.run = run
        self.entries = entries
        self.failures: list[str] = []
        self.no_lease: NoLease | None = None
        self.refused: RemoteRejected | None = None

    def failed(self, server: bytes, exc: PeerUnavailable | ProtocolViolation | RemoteRejected,
               ) -> None:
        """Asking ``server`` failed: no answer, a malformed one, or a ``Reject``."""
        self.failures.append(f"{PeerId(server)}: {exc}")
        if (isinstance(exc, RemoteRejected) and exc.code != RejectCode.NOT_FOUND
                and self.refused is None):
            self.refused = exc

    def answered(self, server: bytes, reply: Message) -> LeaseGrant | None:
        """The grant to take from ``server``'s ``reply``, or None to ask the next server.

        Raises ``ProtocolViolation(INVALID_FIELD)`` for a grant that is not one of the run's
        chunks: counted as the server's failure here; the caller scores the server.
        """
        if isinstance(reply, LeaseGrant):
            problem = grant_problem(reply, self.run, self.entries)
            if not problem:
                return reply
            self.failures.append(f"{PeerId(server)}: {problem}")
            raise ProtocolViolation(RejectCode.INVALID_FIELD, problem)
        if isinstance(reply, NoLease):
            if self.no_lease is None or reply.retry_after_ms < self.no_lease.retry_after_ms:
                self.no_lease = reply
            return None
        self.failures.append(f"{PeerId(server)}: unexpected {type(reply).__name__}")
        return None

    def outcome(self) -> NoLease:
        """What the round came to once every server was asked without a grant.

        Raises:
            RemoteRejected: no server said "nothing free", and one refused (not ``NOT_FOUND``).
            PeerUnavailable: no server answered usefully.
        """
        if self.no_lease is not None:
            return self.no_lease
        if self.refused is not None:
            raise self.refused
        raise PeerUnavailable(
            "no dataset server answered: " + "; ".join(self.failures)[:MAX_SHOWN_FAILURES]
        )


def receipt_for(
    lease: LeaseGrant, peer: bytes, sign: Callable[[bytes], bytes], possession: bytes,
    samples: int | None = None,
) -> Receipt:
    """``peer``'s signed receipt for ``lease``: ``samples`` trained (default: all of them),
    ``possession`` the chunk's ``possession_proof`` under the lease's nonce."""
    return Receipt(
        run=lease.run,
        lease_id=lease.lease_id,
        epoch=lease.epoch,
        chunk=lease.chunk,
        peer=peer,
        samples=lease.samples if samples is None else samples,
        possession=possession,
    ).signed_with(sign)
