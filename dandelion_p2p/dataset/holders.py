"""Who holds what, in the DHT: dataset servers of a run, and peers holding single chunks.

* ``dsrv``, key the run id: each dataset server of the run publishes a ``ServerAnnouncement``
  (it holds every chunk of the manifest and grants leases).
* ``chunk``, key the chunk's 32-byte hash: each peer holding a copy of the chunk publishes a
  ``ChunkHolding``; fetchers ask those peers first, so the servers are not the bottleneck.

A holder's claim is only a hint: the fetcher checks every byte against the hash anyway.
"""

from __future__ import annotations

from dandelion_p2p.dataset.chunks import MAX_CHUNK_BYTES, is_chunk_name
from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.net.dht.records import NamespacePolicy, RecordValidator
from dandelion_p2p.wire import Message, Registry, RejectCode, decode, encode, invalid

HOLDERS = Registry("dataset-holders")

SERVERS_NAMESPACE = "dsrv"
CHUNK_NAMESPACE = "chunk"
HOLDING_TTL = 1800.0
MAX_TTL_MS = 3_600_000


@HOLDERS.message(1)
class ServerAnnouncement(Message):
    run: str
    manifest: str
    """blake3 of the manifest's canonical JSON, so fetchers can tell datasets apart."""
    chunks: int
    samples: int

    def check(self) -> None:
        if not 0 < len(self.run) <= 128:
            raise invalid("ServerAnnouncement.run: 1..128 characters")
        if not is_chunk_name(self.manifest):
            raise invalid("ServerAnnouncement.manifest: not a blake3 hex digest")
        if not (0 < self.chunks < 2**31 and 0 < self.samples < 2**53):
            raise invalid("ServerAnnouncement: counts out of range")


@HOLDERS.message(2)
class ChunkHolding(Message):
    chunk: str
    size: int

    def check(self) -> None:
        if not is_chunk_name(self.chunk):
            raise invalid("ChunkHolding.chunk: not a chunk hash")
        if not 0 < self.size <= MAX_CHUNK_BYTES:
            raise invalid("ChunkHolding.size out of range")


def chunk_key(chunk: str) -> bytes:
    return bytes.fromhex(chunk)


def decode_server(value: bytes) -> ServerAnnouncement:
    msg = decode(value, HOLDERS)
    if not isinstance(msg, ServerAnnouncement):
        raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "value is not a ServerAnnouncement")
    return msg


def decode_holding(value: bytes) -> ChunkHolding:
    msg = decode(value, HOLDERS)
    if not isinstance(msg, ChunkHolding):
        raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "value is not a ChunkHolding")
    return msg


def encode_value(msg: Message) -> bytes:
    return encode(msg)


def _check_server(value: bytes) -> None:
    decode_server(value)


def _check_holding(value: bytes) -> None:
    decode_holding(value)


def register_holder_namespaces(validator: RecordValidator) -> None:
    validator.register(
        SERVERS_NAMESPACE, NamespacePolicy(max_ttl_ms=MAX_TTL_MS, check_value=_check_server)
    )
    validator.register(
        CHUNK_NAMESPACE, NamespacePolicy(max_ttl_ms=MAX_TTL_MS, check_value=_check_holding)
    )
