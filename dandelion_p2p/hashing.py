"""Content hashes of files: BLAKE3, streamed, as lowercase hex."""

from __future__ import annotations

from pathlib import Path

import blake3

_BLOCK = 1 << 22


def file_digest(path: Path) -> str:
    """The BLAKE3 digest of the file at ``path``, read in 4 MiB blocks.

    Raises ``OSError`` when the file cannot be read.
    """
    hasher = blake3.blake3()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()
