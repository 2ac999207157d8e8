"""The block-scaled 4-bit codec: layout, error bound, refusal of malformed payloads, and error
feedback over rounds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dandelion_p2p.averaging.compression import (
    CODECS,
    BufferErrorFeedback,
    Int4BlockCodec,
    get_codec,
)
from tests.averaging.test_compression import (
    assert_error_within_half_a_level,
    gaussian,
    refused,
)

F32_MAX = float(np.finfo(np.float32).max)


def test_registered_with_64_element_blocks():
    codec = get_codec("int4")
    assert isinstance(codec, Int4BlockCodec)
    assert codec.block_size == 64
    assert Int4BlockCodec(32).name == "int4-b32"
    assert "int4-b32" not in CODECS
    with pytest.raises(ValueError):
        Int4BlockCodec(0)


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 127, 128, 1001])
@pytest.mark.parametrize("block", [1, 3, 64])
def test_encoded_size_is_scales_plus_half_a_byte_a_value(n, block):
    codec = Int4BlockCodec(block)
    expected = 4 * -(-n // block) + (n + 1) // 2
    assert codec.encoded_size(n) == expected
    assert len(codec.encode(gaussian(n, seed=n))) == expected


def test_layout_is_scales_then_low_nibble_first():
    x = np.array([1.0, -2.0, 0.5, 0.0, 0.0], np.float32)
    data = Int4BlockCodec(3).encode(x)
    assert len(data) == 8 + 3
    scales = np.frombuffer(data[:8], "<f4")
    assert scales.tolist() == [np.float32(2.0) / np.float32(7.0), 0.0]
    # 1 * (1 / scale) is 3.4999998 in float32, so it rounds to 3; -2 is -7 (0x9); 0.5 is 2.
    # The fifth value's byte has a zero padding nibble on top.
    assert data[8:] == bytes([0x93, 0x02, 0x00])


def test_rounds_half_to_even():
    # A block whose absmax is 7 has scale 1, so these are exact ties.
    x = np.array([7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0], np.float32)
    codec = Int4BlockCodec(8)
    y = codec.decode(codec.encode(x), x.size)
    assert y.tolist() == [7.0, 0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 0.0]


def test_every_nibble_decodes_to_its_twos_complement_value():
    codec = Int4BlockCodec(32)
    # Byte k holds nibble k in the low half and 15 - k in the high half.
    packed = bytes(k | ((15 - k) << 4) for k in range(16))
    payload = np.float32(0.5).tobytes() + packed
    y = codec.decode(payload, 32)
    signed = [v - 16 if v >= 8 else v for v in range(16)]
    expected = [0.5 * s for k in range(16) for s in (signed[k], signed[15 - k])]
    assert y.tolist() == expected  # -8 included: accepted, merely never produced


@pytest.mark.parametrize("block", [64, 256])
def test_relative_l2_for_gaussian_data(block):
    # The module docstring's table: about 10.8 % at 64, 12.6 % at 256.
    x = gaussian(100_003, seed=block)
    codec = Int4BlockCodec(block)
    y = codec.decode(codec.encode(x), x.size)
    error = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert error <= {64: 0.115, 256: 0.135}[block]


@settings(deadline=None)
@given(
    hnp.arrays(
        np.float32, st.integers(1, 700), elements=st.floats(-(2.0**126), 2.0**126, width=32)
    ),
    st.sampled_from([1, 7, 64]),
)
def test_error_bounded_by_block_absmax(x, block):
    assert_error_within_half_a_level(Int4BlockCodec(block), x, block, 7, 1e-37)


def test_extremes_stay_finite():
    big = F32_MAX
    x = np.array([big, -big, big / 2, 1.0, 1e-37, -1e-40, 0.0, 3e-45], np.float32)
    codec = Int4BlockCodec(2)
    y = codec.decode(codec.encode(x), x.size)
    assert np.isfinite(y).all()
    # The capped scale (float32_max / 8) loses up to 1/8 of the largest values.
    np.testing.assert_allclose(y[:2], x[:2], rtol=1 / 8 + 1e-6)
    np.testing.assert_allclose(y[2], x[2], rtol=1 / 14)
    assert np.all(np.abs(y[4:]) <= 1e-36)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encoder_refuses_non_finite_input(bad):
    x = gaussian(301)
    x[200] = bad
    with pytest.raises(ValueError):
        Int4BlockCodec().encode(x)


@pytest.mark.parametrize("scale", [np.nan, np.inf, -np.inf, -1.0, -1e-30, F32_MAX / 7])
def test_decoder_refuses_a_bad_scale(scale):
    codec = Int4BlockCodec(4)
    data = bytearray(codec.encode(np.ones(8, np.float32)))
    data[4:8] = np.float32(scale).tobytes()
    refused(codec, bytes(data), 8)


def test_decoder_accepts_the_largest_scale():
    codec = Int4BlockCodec(2)
    payload = np.float32(F32_MAX / 8).tobytes() + bytes([0x88])  # -8, -8
    y = codec.decode(payload, 2)
    assert np.isfinite(y).all() and y[0] == y[1] == -np.float32(F32_MAX / 8) * 8


@pytest.mark.parametrize("n", [1, 3, 65, 129])
def test_decoder_refuses_a_nonzero_padding_nibble(n):
    codec = Int4BlockCodec()
    data = bytearray(codec.encode(gaussian(n, seed=n)))
    assert data[-1] & 0xF0 == 0
    codec.decode(bytes(data), n)
    for high in (0x10, 0x80, 0xF0):
        bad = bytearray(data)
        bad[-1] |= high
        refused(codec, bytes(bad), n)


def test_even_count_has_no_padding():
    codec = Int4BlockCodec()
    data = bytearray(codec.encode(gaussian(64)))
    data[-1] = 0x77  # both nibbles are values: 7, 7
    scale = np.frombuffer(data[:4], "<f4")[0]
    assert codec.decode(bytes(data), 64)[-2:].tolist() == [7 * scale] * 2


@pytest.mark.parametrize("n", [0, 1, 64, 65, 1000])
def test_decoder_refuses_truncated_and_padded_payloads(n):
    codec = get_codec("int4")
    data = codec.encode(gaussian(n, seed=n))
    for bad in (data + b"\0", data + b"\0" * 4, data[:-1], data[:-4]):
        if len(bad) != len(data):
            refused(codec, bad, n)
    # The same bytes under a count that needs another byte or one less block.
    if n:
        refused(codec, data, n + 2)
    refused(codec, data + b"\0" * 4, n)


def test_decode_result_is_a_fresh_writable_array():
    codec = Int4BlockCodec()
    data = bytearray(codec.encode(gaussian(129)))
    y = codec.decode(memoryview(data), 129)
    assert y.flags.writeable and y.dtype == np.float32
    before = y.copy()
    data[:] = bytes(len(data))
    np.testing.assert_array_equal(y, before)


def sums_over_rounds(x_of_round, rounds: int, size: int):
    codec = get_codec("int4")
    ef = BufferErrorFeedback(codec, size)
    sum_in = np.zeros(size)
    sum_ef = np.zeros(size)
    sum_plain = np.zeros(size)
    for r in range(rounds):
        x = x_of_round(r)
        sum_in += x
        sum_ef += codec.decode(ef.encode(x, 0), size)
        sum_plain += codec.decode(codec.encode(x), size)
    residual = ef.residual()
    assert residual is not None
    # What was sent is what came in minus the residual still held back.
    np.testing.assert_allclose(sum_ef, sum_in - residual, rtol=0, atol=1e-3)
    norm = np.linalg.norm(sum_in)
    return np.linalg.norm(sum_ef - sum_in) / norm, np.linalg.norm(sum_plain - sum_in) / norm


def test_error_feedback_tracks_the_running_sum_of_a_persistent_signal():
    """A fixed direction plus noise (a pseudo-gradient that keeps pointing the same way):
    without feedback each round drops much the same part of it, so the sum keeps several
    percent of error (about 6 % here); with it the error is one round's residual spread
    over all the rounds (about 0.1 %)."""
    rng = np.random.default_rng(3)
    size, rounds = 4096, 100
    signal = rng.standard_normal(size).astype(np.float32)
    ef_error, plain_error = sums_over_rounds(
        lambda _r: signal + 0.05 * rng.standard_normal(size).astype(np.float32), rounds, size
    )
    assert plain_error > 0.05
    assert ef_error < 0.005
    assert ef_error < plain_error / 20


def test_error_feedback_tracks_the_running_sum_of_noise():
    """Independent rounds: without feedback the errors add up like the inputs do, so the
    sum keeps one encoding's relative error (about 11 %); with it they do not add up at all
    (about 1.4 % after 64 rounds)."""
    rng = np.random.default_rng(4)
    size, rounds = 4096, 64
    ef_error, plain_error = sums_over_rounds(
        lambda _r: rng.standard_normal(size).astype(np.float32), rounds, size
    )
    assert plain_error > 0.08
    assert ef_error < plain_error / 4
