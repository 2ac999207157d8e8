"""The averaged rounds a peer keeps for joiners, and their file format.

A joiner whose download of the swarm's state takes several sync intervals loads a state that
is rounds behind. Every peer keeps the averaged pseudo-gradient of each round it applied (its
span of the vector, as ``round-RRRRRRRR-M.bin`` with M the round's members) in
``CHECKPOINTS/rounds/``, the last ``rounds_to_keep`` of them; its daemon serves them
(``RoundsOffer``, ``RoundRead``: protocol/statesync.md), and the joiner applies them in order
onto the state it loaded (``joining``). Written on a thread, so that a large vector's write
does not hold training up; the next round's write first waits for it.

A joiner must apply exactly the float32 values every member applied, yet fetching them as
float32 costs as much as the weights each round. The members took them decoded from the
run's codec, so they are stored in that codec: encoded again, which gives back the same bytes
whenever the values are a decoding already (blocks never straddle a reducer's span, so the
codec's blocks line up). Every 256-value piece whose decoding is not bit for bit the vector's
is stored as float32 besides. Little-endian layout::

    b"DKR1", codec name (8 bytes, NUL-padded), n (u64), k (u32),
    k piece indices (u32 each, increasing), the codec's payload of n values,
    then each listed piece's float32 values (256, or fewer for the last piece)
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from dandelion_p2p.averaging.compression import CODECS
from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.protocol import ROUNDS_DIR, round_file_name, round_files

log = logging.getLogger(__name__)

MAGIC = b"DKR1"
HEADER = struct.Struct("<4s8sQI")
PIECE = 256


STATE_BYTES_PER_VALUE = 8
"""What a joiner downloads per trained value: the global weights and the outer momentum, in
float32."""
EMA_BYTES_PER_VALUE = 4
"""And the EMA, in float32, when the run keeps one."""
MIN_KEPT = 8
MAX_KEPT = 64


def rounds_to_keep(config: RunConfig) -> int:
    """``checkpoint.keep_rounds``, or when unset, the rounds a joiner needs whose link can
    follow the swarm (fetch one round a sync interval): its state is that many rounds' bytes
    (``STATE_BYTES_PER_VALUE`` over the codec's bytes a value; with F streaming fragments a
    round carries 1/F of the vector, so F times as many), one more for the round that ends
    while it asks for them; at least ``MIN_KEPT``, at most ``MAX_KEPT``. Without EMA or
    fragments: int8 9, int4 16, int2 30."""
    if config.checkpoint.keep_rounds is not None:
        return config.checkpoint.keep_rounds
    codec = CODECS.get(config.averaging.codec) or CODECS["none"]
    values = 1 << 20
    state = STATE_BYTES_PER_VALUE + (EMA_BYTES_PER_VALUE if config.training.ema else 0)
    per_round = codec.encoded_size(values) / values
    rounds = math.ceil(config.sync.fragments * state / per_round) + 1
    return min(MAX_KEPT, max(MIN_KEPT, rounds))


def max_file_size(elements: int) -> int:
    """The largest kept-round file of ``elements`` values: every piece as float32, besides
    the largest codec payload (float32 too)."""
    return HEADER.size + 4 * -(-elements // PIECE) + 8 * elements


def encode_round(vector: NDArray[np.float32], codec_name: str) -> bytes:
    """``vector`` in the kept-round layout, in ``codec_name`` where that is exact ("none"
    when the codec is unknown)."""
    x = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
    codec = CODECS.get(codec_name) or CODECS["none"]
    payload = codec.encode(x)
    pieces = np.arange(0, -(-x.size // PIECE), dtype=np.uint32)
    if codec.name != "none":
        back = codec.decode(payload, x.size).view(np.uint32)
        differs = back != x.view(np.uint32)
        padded = np.zeros(pieces.size * PIECE, dtype=bool)
        padded[: x.size] = differs
        pieces = pieces[padded.reshape(-1, PIECE).any(axis=1)]
    else:
        pieces = pieces[:0]
    raw = b"".join(x[i * PIECE:(i + 1) * PIECE].tobytes() for i in pieces.tolist())
    name = codec.name.encode().ljust(8, b"\0")
    return HEADER.pack(MAGIC, name, x.size, pieces.size) + pieces.astype("<u4").tobytes() \
        + payload + raw


def decode_round(data: bytes, elements: int) -> NDArray[np.float32]:
    """The ``elements`` float32 values of a kept-round file.

    Raises:
        ValueError: the bytes are not a kept round of that many finite values.
    """
    if len(data) < HEADER.size:
        raise ValueError("shorter than its header")
    magic, name, n, k = HEADER.unpack_from(data)
    codec = CODECS.get(name.rstrip(b"\0").decode("ascii", "replace"))
    if magic != MAGIC or codec is None:
        raise ValueError("not a kept round of a known codec")
    if n != elements:
        raise ValueError(f"{n} values, not {elements}")
    n_pieces = -(-n // PIECE)
    if k > n_pieces:
        raise ValueError("more float32 pieces than the vector has")
    at = HEADER.size
    pieces = np.frombuffer(data, dtype="<u4", count=k, offset=at).astype(np.int64)
    at += 4 * k
    if k and (np.any(np.diff(pieces) <= 0) or pieces[-1] >= n_pieces):
        raise ValueError("piece indices out of order or beyond the vector")
    size = codec.encoded_size(n)
    sizes = [min(PIECE, n - int(i) * PIECE) for i in pieces]
    if len(data) != at + size + 4 * sum(sizes):
        raise ValueError("the length does not match its header")
    try:
        vector = codec.decode(memoryview(data)[at:at + size], n)
    except ProtocolViolation as exc:
        raise ValueError(exc.detail) from None
    at += size
    for i, length in zip(pieces.tolist(), sizes, strict=True):
        vector[i * PIECE:i * PIECE + length] = np.frombuffer(data, "<f4", length, at)
        at += 4 * length
    if not np.isfinite(vector).all():
        raise ValueError("non-finite values")
    return vector


def write_round(folder: Path, round_: int, members: int, data: bytes) -> None:
    """Write a kept round's file into ``folder`` atomically (a hidden file renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".round-{round_:08d}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, folder / round_file_name(round_, members))


class RoundArchive:
    def __init__(self, checkpoints: Path, keep: int) -> None:
        self.folder = checkpoints / ROUNDS_DIR
        self.keep = keep
        self.last_added: int | None = None
        """The newest round this process applied with others (None once cleared): the
        global weights are that round's result until another round changes them."""
        self._writing: threading.Thread | None = None

    def add(self, round_: int, members: int, averaged: NDArray[np.float32],
            codec: str) -> None:
        """Keep round ``round_``'s averaged vector (a copy is taken before returning),
        stored in ``codec`` where that is exact."""
        if members < 2:
            self.applied_alone()
            return
        self.last_added = round_
        if self.keep <= 0:
            return
        self.wait()
        copy = np.array(averaged, dtype=np.float32, copy=True)
        self._writing = threading.Thread(target=self._write,
                                         args=(round_, members, copy, codec),
                                         name="kept-round", daemon=True)
        self._writing.start()

    def applied_alone(self) -> None:
        """The global weights took a round that was not averaged with others: they are no
        longer the result of ``last_added``."""
        self.last_added = None

    def wait(self) -> None:
        if self._writing is not None:
            self._writing.join()
            self._writing = None

    def clear(self) -> None:
        """Forget every kept round (the state was replaced: they may not lead to it)."""
        self.wait()
        self.last_added = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def _write(self, round_: int, members: int, averaged: NDArray[np.float32],
               codec: str) -> None:
        try:
            data = encode_round(averaged, codec)
            kept = {r: path for r, (path, _) in round_files(self.folder).items()}
            # Rounds from this one on belong to another history (a state loaded since).
            for r in [r for r in kept if r >= round_]:
                kept.pop(r).unlink(missing_ok=True)
            write_round(self.folder, round_, members, data)
            for r in sorted(kept)[: max(0, len(kept) + 1 - self.keep)]:
                kept[r].unlink(missing_ok=True)
        except (OSError, ValueError) as exc:
            log.warning("cannot keep round %d for joiners: %s", round_, exc)
