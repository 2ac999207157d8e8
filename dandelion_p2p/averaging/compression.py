"""Codecs for float32 vectors on the wire, and error feedback for the lossy ones.

Byte layouts. Everything is little-endian and there is no header: the element count and the
codec name travel in the enclosing message, and ``decode`` checks the length against them
exactly, so a truncated or padded payload is refused rather than misread.

``none``  ``4n`` bytes: the float32 values.
``fp16``  ``2n`` bytes: IEEE binary16, round to nearest even. Finite values beyond +-65504
          saturate to +-65504 instead of becoming infinite: a reducer excludes any
          contribution holding infinity, and a large but honest value must not cost the
          sender its whole contribution.
``bf16``  ``2n`` bytes: bfloat16, the high half of the float32 bit pattern after rounding to
          nearest even (integer arithmetic on the bits). Values that round past the largest
          bfloat16 saturate to it, as in fp16.
``int8``  with block size ``b`` (256 unless configured) and ``m = ceil(n / b)`` blocks:
          ``m`` float32 scales (``4m`` bytes), then ``n`` int8 values (``n`` bytes);
          ``4m + n`` bytes in all. Element ``j`` decodes to ``q[j] * scale[j // b]``; the
          last block may hold fewer than ``b`` elements. The encoder writes
          ``scale = absmax(block) / 127`` and ``q = round_half_even(x / scale)`` in
          ``[-127, 127]``; an all-zero block has scale 0. A scale that is negative, not
          finite, or above ``float32_max / 128`` (so that ``q * scale`` could overflow) is
          refused; ``q = -128`` is accepted, it is merely never produced.
``int4``  with block size ``b`` (64 unless configured) and ``m = ceil(n / b)`` blocks:
          ``m`` float32 scales (``4m`` bytes), then ``ceil(n / 2)`` bytes of 4-bit two's
          complement values, two a byte: element ``j`` is in byte ``j // 2``, in the low
          nibble for even ``j`` and the high nibble for odd ``j``; ``4m + ceil(n / 2)`` bytes
          in all. For an odd ``n`` the last byte's high nibble is padding and must be zero.
          Element ``j`` decodes to ``q[j] * scale[j // b]``. The encoder writes
          ``scale = absmax(block) / 7`` and ``q = round_half_even(x / scale)`` in ``[-7, 7]``;
          an all-zero block has scale 0. A scale that is negative, not finite, or above
          ``float32_max / 8`` is refused; ``q = -8`` is accepted, it is merely never produced.
          Block size: the scales cost ``32 / b`` bits a value, and a smaller block follows
          the data's local magnitude more closely. Relative L2 error of one encoding, with
          the bits a value it costs:

          ============  =========  =========  =========  =========
          ``b``         32 (5.0)   64 (4.5)   128 (4.25) 256 (4.125)
          gaussian      9.7 %      10.8 %     11.7 %     12.6 %
          Student t3    14 %       18 %       22 %       28 %
          ============  =========  =========  =========  =========

          (Measured on a million values.) 64 is the default: the scales take a ninth of the
          payload, a smaller block buys a tenth (gaussian) to a fifth (Student t3) less
          error for each further half bit a value, and beyond it the error on heavy-tailed
          data, whose few large values inflate a block's scale, grows by about a quarter per
          doubling.

``int2``  with block size ``b`` (128 unless configured) and ``m = ceil(n / b)`` blocks:
          ``m`` float32 scales (``4m`` bytes), then ``ceil(n / 4)`` bytes of 2-bit codes
          ``c``, four a byte: element ``j`` is in byte ``j // 4`` at bits ``2 (j % 4)`` and
          ``2 (j % 4) + 1``; ``4m + ceil(n / 4)`` bytes in all (2.25 bits a value). Unused
          codes of the last byte are padding and must be zero. Element ``j`` decodes to
          ``(2 c[j] - 3) * scale[j // b]``: the levels -3s, -s, s, 3s. The encoder writes
          ``scale = 0.75 * rms(block)`` and the nearest level, the thresholds at -2s, 0
          and 2s, so values beyond 3s are clipped; a block whose RMS is subnormal has scale
          0, and a block whose magnitudes are only m and 3m (one it decoded) has scale m,
          so that it encodes again exactly. A scale that is negative, not finite, or above
          ``float32_max / 4`` is refused.

Error bounds (``x`` the input, ``y = decode(encode(x))``):

``none``  exact.
``fp16``  ``|y - x| <= 2**-11 * |x|`` for ``2**-14 <= |x| <= 65504`` (normal range);
          ``|y - x| <= 2**-25`` below it (subnormals).
``bf16``  ``|y - x| <= 2**-8 * |x|`` for normal float32 values up to the largest bfloat16.
``int8``  ``|y - x| <= absmax(block) / 254`` (plus float32 rounding); for gaussian data and
          ``b = 256`` the relative L2 error is about 0.7 %. Outside float32's comfortable
          range: a block whose absmax is below ``127 * 2**-126`` (about 1.5e-36) is sent as
          zeros, and the scale is capped at ``float32_max / 128`` (blocks beyond about
          3.4e38 * 127/128 lose up to 1/128 of their largest values).
``int4``  ``|y - x| <= absmax(block) / 14`` (plus float32 rounding); relative L2 error about
          11 % on gaussian data with ``b = 64`` (see the table above), which is why it is
          meant for use with error feedback (below). As in int8, a block whose absmax is
          below ``7 * 2**-126`` is sent as zeros, and the scale is capped at
          ``float32_max / 8`` (blocks beyond about 3.4e38 * 7/8 lose up to 1/8 of their
          largest values).

``int2``  no bound per element (values beyond 3 scales are clipped); relative L2 error about
          44 % on gaussian data and 61 % on Student t3 (a million values). Only for vectors
          averaged round after round with error feedback, which sends the rest later.

Encoders refuse non-finite input with ``ValueError``: it is a local bug (a diverged trainer),
and sending it would only get the whole contribution excluded by the reducer.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dandelion_p2p.errors import ProtocolViolation, RejectCode

FloatArray = NDArray[np.float32]
Buffer = bytes | bytearray | memoryview

DEFAULT_INT8_BLOCK = 256
FP16_MAX = 65504.0
# The largest float32 that rounds (to nearest even) to a finite bfloat16: 0x7F7F8000 is the
# tie between the largest bfloat16 and infinity, and the odd 0x7F7F rounds it up.
_LITTLE_ENDIAN = sys.byteorder == "little"
_BF16_LIMIT = float(np.array(0x7F7F7FFF, dtype=np.uint32).view(np.float32))
_INT8_MIN_ABSMAX = np.float32(127.0) * np.finfo(np.float32).smallest_normal
# Exact, and 128 * it is still finite, so no accepted payload (q = -128 included) decodes to
# infinity.
_INT8_MAX_SCALE = np.finfo(np.float32).max / np.float32(128.0)
DEFAULT_INT4_BLOCK = 64
DEFAULT_INT2_BLOCK = 128
# Levels at +-0.75 and +-2.25 of the block's RMS. The mean-square-optimal uniform quantiser of
# a gaussian (+-0.498, +-1.494) loses less in one encoding (34 % against 44 %) but clips
# more, and under error feedback what it clips piles up: local steps with it learned 8 %
# worse than uncompressed in benchmarks/quality.py, with 0.65 to 0.75 within 1 %.
_INT2_STEP_OF_RMS = 0.75
_INT2_MIN_RMS = np.finfo(np.float32).smallest_normal
# Exact, and 4 * it is still finite: every accepted payload (3 * scale at most) decodes finite.
_INT2_MAX_SCALE = np.finfo(np.float32).max / np.float32(4.0)
_INT4_MIN_ABSMAX = np.float32(7.0) * np.finfo(np.float32).smallest_normal
# Exact, and 8 * it is still finite (q = -8 included).
_INT4_MAX_SCALE = np.finfo(np.float32).max / np.float32(8.0)


class Codec(ABC):
    """Turns a float32 vector into bytes and back. Stateless and safe to share."""

    name: str

    @abstractmethod
    def encoded_size(self, n_elements: int) -> int:
        """Exact payload length in bytes for ``n_elements`` values."""

    @abstractmethod
    def encode(self, array: NDArray[Any]) -> bytes:
        """Encode the values of ``array`` (any shape, read in C order) as float32.

        Raises ``ValueError`` if a value is NaN or infinite.
        """

    @abstractmethod
    def decode(self, data: Buffer, n_elements: int) -> FloatArray:
        """Decode a payload into a new, writable 1-D float32 array of ``n_elements``.

        The result holds only finite values. Raises ``ProtocolViolation(INVALID_FIELD)`` when
        the payload length is not exactly ``encoded_size(n_elements)``, or it would decode to
        NaN or infinity: the bytes come from a remote peer.
        """

    def encode_view(self, array: NDArray[Any]) -> Buffer:
        """Like ``encode``, but may return a view of ``array``'s memory instead of a copy:
        valid while ``array`` is left unchanged."""
        return self.encode(array)

    def decode_view(self, data: Buffer, n_elements: int) -> FloatArray:
        """Like ``decode``, but the result may be a read-only view of ``data``: valid while
        ``data`` is left unchanged."""
        return self.decode(data, n_elements)

    def _check_length(self, data: Buffer, n_elements: int) -> memoryview:
        if n_elements < 0:
            raise ValueError(f"n_elements must be >= 0, got {n_elements}")
        view = memoryview(data).cast("B")
        expected = self.encoded_size(n_elements)
        if view.nbytes != expected:
            raise ProtocolViolation(
                RejectCode.INVALID_FIELD,
                f"{self.name} payload for {n_elements} elements must be {expected} bytes, "
                f"got {view.nbytes}",
            )
        return view

    def _finite(self, decoded: FloatArray) -> FloatArray:
        if decoded.size and not (
            math.isfinite(float(decoded.min())) and math.isfinite(float(decoded.max()))
        ):
            raise ProtocolViolation(
                RejectCode.INVALID_FIELD, f"{self.name} payload holds NaN or infinity"
            )
        return decoded


class RawCodec(Codec):
    name = "none"

    def encoded_size(self, n_elements: int) -> int:
        return 4 * n_elements

    def encode(self, array: NDArray[Any]) -> bytes:
        x = _finite_float32(array)
        return x.astype("<f4", copy=False).tobytes()

    def decode(self, data: Buffer, n_elements: int) -> FloatArray:
        view = self._check_length(data, n_elements)
        return self._finite(np.frombuffer(view, dtype="<f4").astype(np.float32))

    # The payload is the array's own bytes on little-endian machines: a 100 MB round then
    # costs no encode or decode copy at all.
    def encode_view(self, array: NDArray[Any]) -> Buffer:
        x = _finite_float32(array)
        if not _LITTLE_ENDIAN:
            return self.encode(x)
        return memoryview(x).cast("B")  # type: ignore[arg-type]

    def decode_view(self, data: Buffer, n_elements: int) -> FloatArray:
        view = self._check_length(data, n_elements)
        decoded: FloatArray = np.frombuffer(view, dtype="<f4")
        if not _LITTLE_ENDIAN:
            decoded = decoded.astype(np.float32)
        return self._finite(decoded)


class Fp16Codec(Codec):
    name = "fp16"

    def encoded_size(self, n_elements: int) -> int:
        return 2 * n_elements

    def encode(self, array: NDArray[Any]) -> bytes:
        x = _finite_float32(array, limit=FP16_MAX)
        return x.astype("<f2").tobytes()

    def decode(self, data: Buffer, n_elements: int) -> FloatArray:
        view = self._check_length(data, n_elements)
        return self._finite(np.frombuffer(view, dtype="<f2").astype(np.float32))


class Bf16Codec(Codec):
    name = "bf16"

    def encoded_size(self, n_elements: int) -> int:
        return 2 * n_elements

    def encode(self, array: NDArray[Any]) -> bytes:
        bits = _finite_float32(array, limit=_BF16_LIMIT).view(np.uint32)
        # Round to nearest even on the dropped low half: add 0x7FFF, plus one more when the
        # kept half is odd, and let the carry ripple into the exponent. Inputs are finite and
        # at most _BF16_LIMIT, so nothing wraps and nothing rounds up to infinity.
        rounded = bits >> 16
        rounded &= 1
        rounded += bits
        rounded += 0x7FFF
        rounded >>= 16
        return rounded.astype("<u2").tobytes()

    def decode(self, data: Buffer, n_elements: int) -> FloatArray:
        view = self._check_length(data, n_elements)
        halves = np.frombuffer(view, dtype="<u2")
        bits = halves.astype(np.uint32)
        bits <<= 16
        return self._finite(bits.view(np.float32))


class _BlockCodec(Codec):
    """Float32 scales, one per block of ``block_size`` elements, then the quantised values;
    named ``kind`` at the default block size and ``kind-b<size>`` otherwise."""

    def __init__(self, kind: str, block_size: int, default_block: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.name = kind if block_size == default_block else f"{kind}-b{block_size}"

    def n_blocks(self, n_elements: int) -> int:
        return -(-n_elements // self.block_size)

    def _scales(self, view: memoryview, m: int, limit: np.float32) -> NDArray[np.float32]:
        scales = np.frombuffer(view, dtype="<f4", count=m)
        # NaN fails both comparisons; the upper limit keeps every decoded value finite.
        if not ((scales >= 0) & (scales <= limit)).all():
            raise ProtocolViolation(
                RejectCode.INVALID_FIELD, f"{self.name} payload has a scale out of range"
            )
        return scales


class Int8BlockCodec(_BlockCodec):
    """Blockwise absmax int8; see the module docstring for the layout and error bound."""

    def __init__(self, block_size: int = DEFAULT_INT8_BLOCK) -> None:
        super().__init__("int8", block_size, DEFAULT_INT8_BLOCK)

    def encoded_size(self, n_elements: int) -> int:
        return 4 * self.n_blocks(n_elements) + n_elements

    def encode(self, array: NDArray[Any]) -> bytes:
        x = _finite_float32(array)
        n = x.size
        m = self.n_blocks(n)
        out = np.empty(4 * m + n, dtype=np.uint8)
        _quantise(
            x, self.block_size, 127, _INT8_MIN_ABSMAX, _INT8_MAX_SCALE,
            out[: 4 * m].view("<f4"), out[4 * m :].view(np.int8),
        )
        return out.tobytes()

    def decode(self, data: Buffer, n_elements: int) -> FloatArray:
        view = self._check_length(data, n_elements)
        m = self.n_blocks(n_elements)
        scales = self._scales(view, m, _INT8_MAX_SCALE)
        values = np.frombuffer(view, dtype=np.int8, offset=4 * m)
        return _dequantise(values, scales, self.block_size)


class Int4BlockCodec(_BlockCodec):
    """Blockwise absmax int4, two values a byte; see the module docstring for the layout, the
    error bound and the choice of block size."""

    def __init__(self, block_size: int = DEFAULT_INT4_BLOCK) -> None:
        super().__init__("int4", block_size, DEFAULT_INT4_BLOCK)

    def encoded_size(self, n_elements: int) -> int:
        return 4 * self.n_blocks(n_elements) + (n_elements + 1) // 2

    def encode(self, array: NDArray[Any]) -> bytes:
        x = _finite_float32(array)
        n = x.size
        m = self.n_blocks(n)
        out = np.empty(self.encoded_size(n), dtype=np.uint8)
        # One spare zero value for an odd count, so that the padding nibble is zero.
        q = np.zeros(n + n % 2, dtype=np.int8)
        _quantise(
            x, self.block_size, 7, _INT4_MIN_ABSMAX, _INT4_MAX_SCALE,
            out[: 4 * m].view("<f4"), q[:n],
        )
        nibbles = q.view(np.uint8)
        packed = out[4 * m :]
        np.bitwise_and(nibbles[0::2], 0x0F, out=packed)
        high = nibbles[1::2] << 4
        packed |= high
        return out.tobytes()

    def decode(self, data: Buffer, n_elements: int) -> FloatArray:
        view = self._check_length(data, n_elements)
        m = self.n_blocks(n_elements)
        scales = self._scales(view, m, _INT4_MAX_SCALE)
        packed = np.frombuffer(view, dtype=np.uint8, offset=4 * m)
        if n_elements % 2 and packed[-1] & 0xF0:
            raise ProtocolViolation(
                RejectCode.INVALID_FIELD, f"{self.name} payload has a nonzero padding nibble"
            )
        # Arithmetic shifts of the signed bytes sign-extend each nibble.
        values = np.empty(2 * packed.size, dtype=np.int8)
        low = values[0::2]
        np.left_shift(packed, 4, out=low.view(np.uint8))
        low >>= 4
        np.right_shift(packed.view(np.int8), 4, out=values[1::2])
        return _dequantise(values[:n_elements], scales, self.block_size)


class Int2BlockCodec(_BlockCodec):
    """Blockwise RMS-scaled 2-bit values, four a byte; see the module docstring for the
    layout and the error, and use it only with error feedback."""

    def __init__(self, block_size: int = DEFAULT_INT2_BLOCK) -> None:
        super().__init__("int2", block_size, DEFAULT_INT2_BLOCK)

    def encoded_size(self, n_elements: int) -> int:
        return 4 * self.n_blocks(n_elements) + (n_elements + 3) // 4

    def encode(self, array: NDArray[Any]) -> bytes:
        x = _finite_float32(array)
        n = x.size
        m = self.n_blocks(n)
        out = np.zeros(self.encoded_size(n), dtype=np.uint8)
        scales = out[: 4 * m].view("<f4")
        # Spare codes up to a whole byte stay 0, the padding the decoder requires.
        codes = np.zeros(-(-n // 4) * 4, dtype=np.uint8)
        for elems, blocks, shape in _block_layout(n, self.block_size):
            rows = x[elems].reshape(shape)
            rms = np.sqrt(np.mean(np.square(rows, dtype=np.float64), axis=1))
            scale = np.where(rms >= _INT2_MIN_RMS, rms * _INT2_STEP_OF_RMS, 0.0)
            scale = np.minimum(scale, _INT2_MAX_SCALE).astype(np.float32)
            # A block of two magnitudes m and 3m is a decoded int2 block (an average kept for
            # joiners is encoded again): m as its scale encodes it exactly.
            magnitudes = np.abs(rows)
            smallest = np.minimum(magnitudes.min(axis=1), _INT2_MAX_SCALE)
            two_levels = ((magnitudes == smallest[:, None])
                          | (magnitudes == (np.float32(3.0) * smallest)[:, None])).all(axis=1)
            again = (smallest > 0) & two_levels
            scale[again] = smallest[again]
            scales[blocks] = scale
            # Thresholds at -2s, 0, 2s; a block of scale 0 decodes to 0 whatever its codes.
            inverse = np.zeros_like(scale)
            np.divide(np.float32(0.5), scale, out=inverse, where=scale > 0)
            level = np.floor(rows * inverse[:, None]) + 2
            codes[elems] = np.clip(level, 0, 3).astype(np.uint8).reshape(-1)
        packed = out[4 * m :]
        packed[:] = codes[0::4]
        for shift in (1, 2, 3):
            packed |= codes[shift::4] << (2 * shift)
        return out.tobytes()

    def decode(self, data: Buffer, n_elements: int) -> FloatArray:
        view = self._check_length(data, n_elements)
        m = self.n_blocks(n_elements)
        scales = self._scales(view, m, _INT2_MAX_SCALE)
        packed = np.frombuffer(view, dtype=np.uint8, offset=4 * m)
        spare = 4 * packed.size - n_elements
        if spare and packed[-1] >> (2 * (4 - spare)):
            raise ProtocolViolation(
                RejectCode.INVALID_FIELD, f"{self.name} payload has nonzero padding bits"
            )
        levels = np.empty(4 * packed.size, dtype=np.int8)
        for shift in range(4):
            np.right_shift(packed, 2 * shift, out=levels[shift::4].view(np.uint8))
        levels &= 3
        levels *= 2
        levels -= 3
        return _dequantise(levels[:n_elements], scales, self.block_size)


def _block_layout(n: int, b: int) -> list[tuple[slice, slice, tuple[int, int]]]:
    """(element slice, block slice, 2-D shape) for the full blocks, then the short last one.

    Working on these 2-D views keeps every operation vectorised without padding a copy.
    """
    full = n // b
    parts = []
    if full:
        parts.append((slice(0, full * b), slice(0, full), (full, b)))
    if n > full * b:
        parts.append((slice(full * b, n), slice(full, full + 1), (1, n - full * b)))
    return parts


def _quantise(
    x: FloatArray,
    b: int,
    qmax: int,
    min_absmax: np.float32,
    max_scale: np.float32,
    scales: NDArray[np.float32],
    values: NDArray[np.int8],
) -> None:
    """Write the absmax scale of each block of ``b`` elements of ``x`` to ``scales`` and its
    values, rounded half to even to integers in ``[-qmax, qmax]``, to ``values``."""
    for elems, blocks, shape in _block_layout(x.size, b):
        rows = x[elems].reshape(shape)
        absmax = np.maximum(rows.max(axis=1), -rows.min(axis=1))
        # A subnormal scale is too coarse to keep |x / scale| below qmax + 0.5 and its
        # inverse overflows, so such blocks are sent as zeros.
        scale = np.where(absmax >= min_absmax, absmax / np.float32(qmax), 0)
        capped = scale > max_scale
        scale = np.minimum(scale, max_scale, dtype=np.float32)
        scales[blocks] = scale
        inverse = np.zeros_like(scale)
        np.divide(np.float32(1.0), scale, out=inverse, where=scale > 0)
        scaled = rows * inverse[:, None]
        np.rint(scaled, out=scaled)
        if capped.any():
            np.clip(scaled, -qmax, qmax, out=scaled)
        values[elems] = scaled.reshape(-1)


def _dequantise(values: NDArray[np.int8], scales: NDArray[np.float32], b: int) -> FloatArray:
    """``values[j] * scales[j // b]`` as a new float32 array."""
    out = np.empty(values.size, dtype=np.float32)
    for elems, blocks, shape in _block_layout(values.size, b):
        np.multiply(
            values[elems].reshape(shape),
            scales[blocks][:, None],
            out=out[elems].reshape(shape),
        )
    return out


def _finite_float32(array: NDArray[Any], limit: float | None = None) -> FloatArray:
    """``array`` as contiguous 1-D float32 (no copy when it already is), saturated to
    ``[-limit, limit]``; raises ``ValueError`` on NaN or infinity."""
    x = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    if x.size == 0:
        return x
    # min and max propagate NaN, so two reductions check finiteness and range at once,
    # without the temporary a full isfinite mask would need.
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("cannot encode NaN or infinite values")
    if limit is not None and (hi > limit or lo < -limit):
        x = np.clip(x, -limit, limit)
    return x


CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec) -> None:
    if codec.name in CODECS:
        raise ValueError(f"codec {codec.name!r} is already registered")
    CODECS[codec.name] = codec


def get_codec(name: str) -> Codec:
    """The codec registered as ``name``.

    Raises ``ProtocolViolation(INVALID_FIELD)`` for an unknown name, which normally arrives in
    a peer's message; check ``name in CODECS`` first when validating local configuration.
    """
    try:
        return CODECS[name]
    except KeyError:
        raise ProtocolViolation(RejectCode.INVALID_FIELD, f"unknown codec {name!r}") from None


for _codec in (RawCodec(), Fp16Codec(), Bf16Codec(), Int8BlockCodec(), Int4BlockCodec(),
               Int2BlockCodec()):
    register_codec(_codec)


class BufferErrorFeedback:
    """Error feedback over a whole vector that is averaged round after round (a gradient or
    pseudo-gradient), whatever the group and hence the chunk layout of each round.

    Two residuals of the vector's size: one for this peer's contributions (the chunks it
    sends), one for the results it computes as a reducer (the means it sends back), since
    an error in a contribution reaches the mean scaled by the peer's share and an error in a
    result reaches it whole. A residual survives a round in which the same elements fall in
    another chunk or span. Both start as zero pages the kernel maps lazily: a peer that
    reduces a quarter of the vector holds a quarter of the result residual.
    """

    def __init__(self, codec: Codec, size: int) -> None:
        if size <= 0:
            raise ValueError("size must be positive")
        self.codec = codec
        self.size = size
        self._residuals: dict[str, FloatArray] = {}

    def encode(self, values: NDArray[Any], start: int) -> bytes:
        """Encode this peer's ``values`` (elements ``start:start+len(values)``) with their
        residual added, and keep the new residual.

        Raises ``ValueError`` on non-finite input or a range outside the vector; the residual
        is left untouched then.
        """
        return self._encode("contribution", values, start)

    def encode_result(self, values: NDArray[Any], start: int) -> bytes:
        """Like ``encode``, for a reduced result this peer sends to every member."""
        return self._encode("result", values, start)

    def _encode(self, kind: str, values: NDArray[Any], start: int) -> bytes:
        x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        end = start + x.size
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"range {start}:{end} outside a vector of {self.size}")
        whole = self._residuals.get(kind)
        if whole is None:
            whole = self._residuals[kind] = np.zeros(self.size, dtype=np.float32)
        residual = whole[start:end]
        corrected = x + residual
        data = self.codec.encode(corrected)
        np.subtract(corrected, self.codec.decode(data, x.size), out=residual)
        return data

    def residual(self, kind: str = "contribution") -> FloatArray | None:
        """A copy of one whole residual ("contribution" or "result"), or ``None`` before its
        first use."""
        whole = self._residuals.get(kind)
        return None if whole is None else whole.copy()

    def reset(self) -> None:
        self._residuals.clear()
