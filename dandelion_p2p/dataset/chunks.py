"""Content-addressed chunk files: a chunk is a WebDataset tar named ``<blake3 hex>.tar``.

Names come from the network; only a well-formed 64-digit lowercase hex name is ever turned
into a path, so no request can reach a file outside the chunk directory.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import blake3

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.wire import RejectCode

CHUNK_SUFFIX = ".tar"
HASH_HEX = 64
MAX_CHUNK_BYTES = 256 * 1024 * 1024
"""The largest chunk anyone packs, serves or accepts."""
_HASH = re.compile(r"[0-9a-f]{64}")


def is_chunk_name(name: str) -> bool:
    return _HASH.fullmatch(name) is not None


def check_chunk_name(name: str) -> str:
    """Return ``name`` if it is a chunk hash; raises ``ProtocolViolation(INVALID_FIELD)``."""
    if not is_chunk_name(name):
        shown = name[:80] + ("..." if len(name) > 80 else "")
        raise ProtocolViolation(RejectCode.INVALID_FIELD, f"not a chunk hash: {shown!r}")
    return name


def chunk_hash(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


class ChunkDir:
    """A directory of chunk files. Writes are atomic (temporary file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, name: str) -> Path:
        return self.root / (check_chunk_name(name) + CHUNK_SUFFIX)

    def has(self, name: str) -> bool:
        return is_chunk_name(name) and self.path_of(name).is_file()

    def size_of(self, name: str) -> int | None:
        try:
            return self.path_of(name).stat().st_size
        except (OSError, ProtocolViolation):
            return None

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name[: -len(CHUNK_SUFFIX)]
            for p in self.root.iterdir()
            if p.name.endswith(CHUNK_SUFFIX) and is_chunk_name(p.name[: -len(CHUNK_SUFFIX)])
        )

    def write(self, name: str, data: bytes) -> Path:
        """Store verified bytes under their hash; raises ``ValueError`` if they do not match."""
        if chunk_hash(data) != name:
            raise ValueError("chunk bytes do not match their name")
        path = self.path_of(name)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{os.getpid()}.part")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path_of(name).unlink()


def possession_proof(nonce: bytes, data: bytes) -> bytes:
    """Keyed BLAKE3 of a chunk's bytes under a lease's 32-byte nonce: computable only by
    whoever holds the bytes once the nonce is known, and fresh for every lease."""
    return blake3.blake3(data, key=nonce).digest()


def file_possession_proof(nonce: bytes, path: Path) -> bytes:
    """``possession_proof`` of the chunk stored at ``path``, read without loading it whole."""
    hasher = blake3.blake3(key=nonce)
    hasher.update_mmap(path)
    return hasher.digest()
