"""Messages of the ``dataset`` protocol family (spec: protocol/dataset.md).

Two protocols: leases (one request, one reply per stream) and chunk transfer (one request,
then a header and the chunk's bytes in bounded parts). Chunk names are the 64-digit hex
blake3 of the chunk; run ids are as in ``runconfig.publication``.
"""

from __future__ import annotations

from dandelion_p2p.dataset.chunks import MAX_CHUNK_BYTES, is_chunk_name
from dandelion_p2p.identity import MAX_PEER_ID_SIZE
from dandelion_p2p.wire import Message, Registry, invalid
from dandelion_p2p.wire.signed import SignedMessage

DATASET = Registry("dataset")

LEASE_PROTOCOL = "/dandelion/dataset/lease/2.0.0"
CHUNK_PROTOCOL = "/dandelion/dataset/chunk/1.0.0"
MAX_REQUEST = 4096
MAX_REPLY = 4096
PART_BYTES = 1 << 20
MAX_PART_FRAME = PART_BYTES + 256
MAX_RUN_ID = 128
POSSESSION_BYTES = 32
"""Length of a lease's nonce and of the possession proof keyed with it (a BLAKE3 key)."""


def _check_run(run: str, where: str) -> None:
    if not 0 < len(run) <= MAX_RUN_ID:
        raise invalid(f"{where}.run: 1..{MAX_RUN_ID} characters")


def _check_chunk(chunk: str, where: str) -> None:
    if not is_chunk_name(chunk):
        raise invalid(f"{where}.chunk: not a chunk hash")


@DATASET.message(1)
class LeaseRequest(Message):
    """Ask for a chunk of ``run`` to train on."""

    run: str

    def check(self) -> None:
        _check_run(self.run, "LeaseRequest")


@DATASET.message(2)
class LeaseGrant(Message):
    """``chunk`` is leased to the asker; its receipt proves possession of the chunk's bytes
    with ``nonce``, fresh for this lease."""

    run: str
    lease_id: int
    epoch: int
    chunk: str
    samples: int
    size: int
    expires_in_ms: int
    nonce: bytes

    def check(self) -> None:
        _check_run(self.run, "LeaseGrant")
        _check_chunk(self.chunk, "LeaseGrant")
        if not (0 < self.lease_id < 2**63 and 0 <= self.epoch < 2**31):
            raise invalid("LeaseGrant: lease id or epoch out of range")
        if not (0 < self.samples < 2**31 and 0 < self.size <= MAX_CHUNK_BYTES):
            raise invalid("LeaseGrant: samples or size out of range")
        if not 0 < self.expires_in_ms <= 86_400_000:
            raise invalid("LeaseGrant.expires_in_ms out of range")
        if len(self.nonce) != POSSESSION_BYTES:
            raise invalid(f"LeaseGrant.nonce: {POSSESSION_BYTES} bytes")


@DATASET.message(3)
class NoLease(Message):
    """Every chunk of the epoch is done or leased out; ask again after ``retry_after_ms``."""

    epoch: int
    retry_after_ms: int

    def check(self) -> None:
        if not 0 <= self.retry_after_ms <= 600_000:
            raise invalid("NoLease.retry_after_ms out of range")


@DATASET.message(4)
class Receipt(SignedMessage):
    """A peer's statement, signed with its key, that it trained on a leased chunk;
    ``possession`` is ``possession_proof(grant.nonce, chunk bytes)``."""

    SIGNING_DOMAIN = b"dandelion/receipt/v2"

    run: str
    lease_id: int
    epoch: int
    chunk: str
    peer: bytes
    samples: int
    possession: bytes
    signature: bytes = b""

    def check(self) -> None:
        _check_run(self.run, "Receipt")
        _check_chunk(self.chunk, "Receipt")
        if not (0 < self.lease_id < 2**63 and 0 <= self.epoch < 2**31):
            raise invalid("Receipt: lease id or epoch out of range")
        if not 2 <= len(self.peer) <= MAX_PEER_ID_SIZE:
            raise invalid("Receipt.peer: not a peer id")
        if not 0 <= self.samples < 2**31:
            raise invalid("Receipt.samples out of range")
        if len(self.possession) != POSSESSION_BYTES:
            raise invalid(f"Receipt.possession: {POSSESSION_BYTES} bytes")
        if len(self.signature) > 64:
            raise invalid("Receipt.signature longer than 64 bytes")


@DATASET.message(5)
class Complete(Message):
    receipt: Receipt


@DATASET.message(6)
class CompleteAck(Message):
    epoch: int
    completed: int
    total: int


@DATASET.message(7)
class GetChunk(Message):
    """Ask for a chunk's bytes by its hash."""

    chunk: str

    def check(self) -> None:
        # Checked in full by the server, which answers a bad name with INVALID_FIELD; a bound
        # here keeps a hostile name out of logs.
        if not 0 < len(self.chunk) <= 128:
            raise invalid("GetChunk.chunk: 1..128 characters")


@DATASET.message(8)
class ChunkHeader(Message):
    """The chunk follows in ``ChunkPart`` frames totalling ``size`` bytes."""

    chunk: str
    size: int

    def check(self) -> None:
        _check_chunk(self.chunk, "ChunkHeader")
        if not 0 < self.size <= MAX_CHUNK_BYTES:
            raise invalid("ChunkHeader.size out of range")


@DATASET.message(9)
class ChunkPart(Message):
    data: bytes

    def check(self) -> None:
        if not 0 < len(self.data) <= PART_BYTES:
            raise invalid(f"ChunkPart.data: 1..{PART_BYTES} bytes")
