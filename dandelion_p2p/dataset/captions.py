"""Reading captions, one way for every scan (``dataset pack`` and the worker's folder scan).

Captions are UTF-8 (a byte order mark at the start is dropped). A caption that is not valid
UTF-8 is read anyway, with U+FFFD in place of the bad bytes, and the scan names it: guessing
another encoding (Latin-1, cp1252, ...) would turn some captions into confident nonsense,
while the replacement character shows where bytes were lost, and the same bytes give the
same text on every peer. Only the first ``MAX_CAPTION_BYTES`` are read.
"""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass
from pathlib import Path

CAPTION_EXTENSIONS = (".txt", ".caption")
MAX_CAPTION_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Caption:
    text: str
    problem: str = ""
    """Empty for valid UTF-8; otherwise what was wrong, to report with the caption's name."""


def decode_caption(data: bytes) -> Caption:
    head = data[:MAX_CAPTION_BYTES]
    cut = len(data) > MAX_CAPTION_BYTES
    try:
        return Caption(_decode(head, cut, "strict").strip())
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start:exc.end]
        return Caption(_decode(head, cut, "replace").strip(),
                       f"not valid UTF-8 (first bad bytes {bad!r}); read with U+FFFD in "
                       "place of the bad bytes")


def read_caption_file(path: str | Path) -> Caption:
    """The caption in ``path``; raises ``OSError`` when it cannot be read."""
    # os.read rather than open(): half the time per file, and a re-scan of a large folder
    # spends most of its time reading captions.
    fd = os.open(path, os.O_RDONLY)
    try:
        parts: list[bytes] = []
        left = MAX_CAPTION_BYTES + 1
        while left > 0:
            part = os.read(fd, left)
            if not part:
                break
            parts.append(part)
            left -= len(part)
    finally:
        os.close(fd)
    return decode_caption(b"".join(parts))


def _decode(head: bytes, cut: bool, errors: str) -> str:
    if not cut:
        return head.decode("utf-8-sig", errors)
    # A caption cut at the limit may end inside a character: that half character is dropped,
    # not taken for a bad byte.
    return codecs.getincrementaldecoder("utf-8-sig")(errors).decode(head, final=False)
