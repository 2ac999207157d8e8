"""The block-scaled 2-bit codec: layout, error, refusal of malformed payloads, and error
feedback over rounds (without which it is not meant to be used)."""

from __future__ import annotations

import numpy as np
import pytest

from dandelion_p2p.averaging.compression import (
    CODECS,
    BufferErrorFeedback,
    Int2BlockCodec,
    get_codec,
)
from tests.averaging.test_compression import refused

F32_MAX = float(np.finfo(np.float32).max)


def test_registered_with_128_element_blocks() -> None:
    codec = get_codec("int2")
    assert isinstance(codec, Int2BlockCodec)
    assert codec.block_size == 128
    assert Int2BlockCodec(64).name == "int2-b64"
    assert "int2-b64" not in CODECS


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 127, 128, 129, 1001])
@pytest.mark.parametrize("block", [1, 3, 128])
def test_encoded_size_is_scales_plus_a_quarter_byte_a_value(n: int, block: int) -> None:
    codec = Int2BlockCodec(block)
    x = np.linspace(-1, 1, n, dtype=np.float32)
    data = codec.encode(x)
    assert len(data) == codec.encoded_size(n) == 4 * (-(-n // block)) + (n + 3) // 4
    assert codec.decode(data, n).shape == (n,)


def test_layout_is_scales_then_the_lowest_bits_first() -> None:
    codec = Int2BlockCodec(8)
    x = np.array([-5, -0.5, 0.5, 5, 0.1, -0.1, 0.2, -0.2], dtype=np.float32)
    data = codec.encode(x)
    scale = np.frombuffer(data[:4], "<f4")[0]
    rms = float(np.sqrt(np.mean(np.square(x.astype(np.float64)))))
    assert scale == pytest.approx(0.75 * rms, rel=1e-6)
    # Thresholds at -2s, 0, 2s; codes 0..3 for the levels -3s, -s, s, 3s.
    assert data[4:] == bytes([0b11_10_01_00, 0b01_10_01_10])
    np.testing.assert_allclose(codec.decode(data, 8),
                               np.array([-3, -1, 1, 3, 1, -1, 1, -1]) * scale)


def test_a_block_of_two_magnitudes_keeps_the_smaller_as_its_scale() -> None:
    codec = Int2BlockCodec(4)
    x = np.array([-1.5, -0.5, 0.5, 1.5], dtype=np.float32)
    data = codec.encode(x)
    assert np.frombuffer(data[:4], "<f4")[0] == np.float32(0.5)
    np.testing.assert_array_equal(codec.decode(data, 4), x)


def test_relative_l2_for_gaussian_data() -> None:
    x = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)
    codec = get_codec("int2")
    y = codec.decode(codec.encode(x), x.size)
    assert 0.40 < np.linalg.norm(y - x) / np.linalg.norm(x) < 0.47


def test_a_zero_or_subnormal_block_decodes_to_zeros() -> None:
    codec = Int2BlockCodec(4)
    x = np.array([0, 0, 0, 0, 1e-40, -1e-40, 0, 0], dtype=np.float32)
    np.testing.assert_array_equal(codec.decode(codec.encode(x), 8), np.zeros(8))


def test_extremes_stay_finite() -> None:
    codec = get_codec("int2")
    x = np.full(300, F32_MAX, dtype=np.float32)
    x[::2] = -F32_MAX
    assert np.isfinite(codec.decode(codec.encode(x), x.size)).all()


@pytest.mark.parametrize("scale", [np.nan, np.inf, -1.0, F32_MAX / 3])
def test_decoder_refuses_a_bad_scale(scale: float) -> None:
    codec = Int2BlockCodec(4)
    payload = np.array([scale], dtype="<f4").tobytes() + b"\xff"
    refused(codec, payload, 4)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 130])
def test_decoder_refuses_nonzero_padding_bits(n: int) -> None:
    codec = get_codec("int2")
    data = bytearray(codec.encode(np.ones(n, dtype=np.float32)))
    codec.decode(bytes(data), n)
    data[-1] |= 0b1100_0000
    refused(codec, bytes(data), n)


@pytest.mark.parametrize("n", [0, 1, 128, 1000])
def test_decoder_refuses_truncated_and_padded_payloads(n: int) -> None:
    codec = get_codec("int2")
    data = codec.encode(np.ones(n, dtype=np.float32))
    refused(codec, data + b"\x00", n)
    if data:
        refused(codec, data[:-1], n)


def test_error_feedback_tracks_the_running_sum_of_a_persistent_signal() -> None:
    """A fixed direction plus noise, 100 rounds: each 2-bit encoding drops about a third of
    it, and the sum of what was sent keeps nearly that much error without feedback; with it,
    the sum is what came in less one round's residual."""
    rng = np.random.default_rng(3)
    size, rounds = 4096, 100
    codec = get_codec("int2")
    signal = rng.standard_normal(size).astype(np.float32)
    ef = BufferErrorFeedback(codec, size)
    sum_in, sum_ef, sum_plain = np.zeros(size), np.zeros(size), np.zeros(size)
    for _ in range(rounds):
        x = signal + 0.05 * rng.standard_normal(size).astype(np.float32)
        sum_in += x
        sum_ef += codec.decode(ef.encode(x, 0), size)
        sum_plain += codec.decode(codec.encode(x), size)
    norm = np.linalg.norm(sum_in)
    ef_error = np.linalg.norm(sum_ef - sum_in) / norm
    plain_error = np.linalg.norm(sum_plain - sum_in) / norm
    assert plain_error > 0.2
    assert ef_error < 0.02


def test_a_decoded_block_encodes_again_exactly() -> None:
    """What a peer keeps of a round for joiners is the decoded average, encoded again in the
    run's codec: it must come back bit for bit."""
    codec = get_codec("int2")
    x = np.random.default_rng(5).standard_normal(1000).astype(np.float32)
    once = codec.decode(codec.encode(x), x.size)
    again = codec.encode(once)
    assert again == codec.encode(codec.decode(again, x.size))
    np.testing.assert_array_equal(codec.decode(again, x.size), once)
