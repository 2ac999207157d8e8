"""The dataset manifest: every chunk's hash, sample count and size, signed by the run owner.

Stored as ``manifest.json``: ``{"manifest": {...}, "signature": "<hex>"}``. The signature
covers the canonical JSON of the ``manifest`` object (sorted keys, no spaces, UTF-8) after a
domain prefix, so a manifest cannot be mistaken for anything else the owner signs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from dandelion_p2p.dataset.chunks import MAX_CHUNK_BYTES, is_chunk_name
from dandelion_p2p.errors import ConfigError
from dandelion_p2p.identity import Identity, PeerId, verify_by_peer

MANIFEST_FILENAME = "manifest.json"
FORMAT = "dandelion-dataset"
FORMAT_VERSION = 1
SIGNING_DOMAIN = b"dandelion/manifest/v1\x00"
MAX_CHUNKS = 1_000_000


@dataclass(frozen=True, slots=True)
class ChunkEntry:
    hash: str
    samples: int
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"hash": self.hash, "samples": self.samples, "size": self.size}


@dataclass(frozen=True)
class Manifest:
    owner: str
    """The run owner's peer id (base58); the manifest is signed by its key."""
    chunks: tuple[ChunkEntry, ...]
    skipped: dict[str, int] = field(default_factory=dict)
    """Why samples were left out while packing, and how many: kept for the record."""

    @property
    def samples(self) -> int:
        return sum(c.samples for c in self.chunks)

    @property
    def size(self) -> int:
        return sum(c.size for c in self.chunks)

    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "owner": self.owner,
            "chunks": [c.to_json() for c in self.chunks],
            "samples": self.samples,
            "bytes": self.size,
            "skipped": dict(sorted(self.skipped.items())),
        }

    def canonical(self) -> bytes:
        return canonical_json(self.body())

    def signed_bytes(self) -> bytes:
        """The bytes the owner's signature covers: the domain, then the canonical body.

        JSON, not msgpack: the manifest is a file people read, so it is not a
        ``SignedMessage``; this is its one definition of what is signed.
        """
        return SIGNING_DOMAIN + self.canonical()

    @property
    def digest(self) -> str:
        return blake3.blake3(self.canonical()).hexdigest()

    def entry(self, name: str) -> ChunkEntry | None:
        for c in self.chunks:
            if c.hash == name:
                return c
        return None


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_manifest(manifest: Manifest, identity: Identity) -> dict[str, Any]:
    if identity.peer_id.to_base58() != manifest.owner:
        raise ConfigError("the manifest must be signed by its owner's key")
    signature = identity.sign(manifest.signed_bytes())
    return {"manifest": manifest.body(), "signature": signature.hex()}


def write_manifest(directory: Path, manifest: Manifest, identity: Identity) -> Path:
    path = directory / MANIFEST_FILENAME
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(sign_manifest(manifest, identity), f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def parse_manifest(data: Any) -> Manifest:
    """Check a signed manifest document; raises ``ConfigError`` saying what is wrong."""
    if not isinstance(data, dict) or set(data) != {"manifest", "signature"}:
        raise ConfigError("manifest: expected {\"manifest\": ..., \"signature\": ...}")
    body, signature_hex = data["manifest"], data["signature"]
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ConfigError(f"manifest: not a {FORMAT} manifest")
    if body.get("version") != FORMAT_VERSION:
        raise ConfigError(f"manifest: version {body.get('version')!r}, expected {FORMAT_VERSION}")
    owner = body.get("owner")
    try:
        owner_bytes = PeerId.from_base58(owner).to_bytes() if isinstance(owner, str) else b""
    except Exception:
        owner_bytes = b""
    if not owner_bytes:
        raise ConfigError("manifest: owner is not a peer id")
    raw_chunks = body.get("chunks")
    if not isinstance(raw_chunks, list) or not 0 < len(raw_chunks) <= MAX_CHUNKS:
        raise ConfigError(f"manifest: chunks must be a list of 1..{MAX_CHUNKS} entries")
    chunks: list[ChunkEntry] = []
    for i, c in enumerate(raw_chunks):
        if not isinstance(c, dict) or set(c) != {"hash", "samples", "size"}:
            raise ConfigError(f"manifest: chunks[{i}] must have hash, samples and size")
        h, n, size = c["hash"], c["samples"], c["size"]
        if not isinstance(h, str) or not is_chunk_name(h):
            raise ConfigError(f"manifest: chunks[{i}].hash is not a blake3 hex digest")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"manifest: chunks[{i}].samples must be a positive integer")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_CHUNK_BYTES:
            raise ConfigError(f"manifest: chunks[{i}].size must be 1..{MAX_CHUNK_BYTES}")
        chunks.append(ChunkEntry(h, n, size))
    if len({c.hash for c in chunks}) != len(chunks):
        raise ConfigError("manifest: a chunk is listed twice")
    skipped = body.get("skipped", {})
    if not isinstance(skipped, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in skipped.items()
    ):
        raise ConfigError("manifest: skipped must map reasons to counts")
    manifest = Manifest(owner=str(owner), chunks=tuple(chunks), skipped=dict(skipped))
    if manifest.body() != body:
        raise ConfigError("manifest: totals or fields do not match its chunks")
    try:
        signature = bytes.fromhex(signature_hex) if isinstance(signature_hex, str) else b""
    except ValueError:
        signature = b""
    if not verify_by_peer(owner_bytes, manifest.signed_bytes(), signature):
        raise ConfigError("manifest: the signature does not verify for its owner")
    return manifest


def signed_document(directory: Path) -> bytes:
    """The canonical JSON of ``manifest.json`` as signed (``{"manifest", "signature"}``).

    Its BLAKE3 (``signed_digest``) is what a run config's ``[dataset] manifest`` names and
    what clients fetch the manifest by; whitespace in the file does not change it.
    """
    path = directory / MANIFEST_FILENAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    parse_manifest(data)
    return canonical_json(data)


def signed_digest(document: bytes) -> str:
    return blake3.blake3(document).hexdigest()


def parse_signed_document(raw: bytes) -> Manifest:
    """A manifest received as bytes; raises ``ConfigError`` if it is not one or is not signed."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"manifest: not JSON: {exc}") from None
    return parse_manifest(data)


def load_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_FILENAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; pack the dataset first") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return parse_manifest(data)
