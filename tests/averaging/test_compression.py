from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dandelion_p2p.averaging.compression import (
    CODECS,
    FP16_MAX,
    Bf16Codec,
    BufferErrorFeedback,
    Codec,
    Fp16Codec,
    Int8BlockCodec,
    RawCodec,
    get_codec,
)
from dandelion_p2p.errors import ProtocolViolation, RejectCode

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
vectors = hnp.arrays(np.float32, st.integers(0, 700), elements=finite_f32)
codec_names = st.sampled_from(sorted(CODECS))


def gaussian(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def refused(codec: Codec, payload: bytes, n: int) -> None:
    """``codec`` refuses ``payload`` for ``n`` elements as an invalid field."""
    with pytest.raises(ProtocolViolation) as err:
        codec.decode(payload, n)
    assert err.value.code == RejectCode.INVALID_FIELD


def test_registry_names():
    assert set(CODECS) >= {"none", "fp16", "bf16", "int8", "int4"}
    assert get_codec("int8").encoded_size(1000) == 4 * 4 + 1000
    assert get_codec("int4").encoded_size(1001) == 4 * 16 + 501
    with pytest.raises(ProtocolViolation) as err:
        get_codec("zstd")
    assert err.value.code == RejectCode.INVALID_FIELD


@settings(deadline=None)
@given(codec_names, vectors)
def test_sizes_and_shapes_round_trip(name, x):
    codec = CODECS[name]
    data = codec.encode(x)
    assert isinstance(data, bytes)
    assert len(data) == codec.encoded_size(x.size)
    y = codec.decode(data, x.size)
    assert y.dtype == np.float32
    assert y.shape == (x.size,)
    assert y.flags.writeable
    assert np.isfinite(y).all()


@settings(deadline=None)
@given(codec_names, st.integers(0, 600), st.integers(-5, 5).filter(lambda d: d != 0))
def test_wrong_length_is_a_protocol_violation(name, n, delta):
    codec = CODECS[name]
    data = codec.encode(gaussian(n))
    bad = data + b"\0" * delta if delta > 0 else data[:delta]
    if len(bad) == len(data):
        return
    with pytest.raises(ProtocolViolation) as err:
        codec.decode(bad, n)
    assert err.value.code == RejectCode.INVALID_FIELD


@settings(deadline=None)
@given(vectors)
def test_none_is_exact_little_endian(x):
    data = RawCodec().encode(x)
    assert data == x.astype("<f4").tobytes()
    np.testing.assert_array_equal(RawCodec().decode(data, x.size), x)


@settings(deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 300), elements=finite_f32))
def test_fp16_relative_error_in_normal_range(x):
    y = Fp16Codec().decode(Fp16Codec().encode(x), x.size).astype(np.float64)
    x64 = x.astype(np.float64)
    normal = (np.abs(x64) >= 2.0**-14) & (np.abs(x64) <= FP16_MAX)
    assert np.all(np.abs(y - x64)[normal] <= 2.0**-11 * np.abs(x64)[normal])
    tiny = np.abs(x64) < 2.0**-14
    assert np.all(np.abs(y - x64)[tiny] <= 2.0**-25)
    big = np.abs(x64) > FP16_MAX
    assert np.all(y[big] == np.sign(x64[big]) * FP16_MAX), "saturates instead of overflowing"


@settings(deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 300), elements=finite_f32))
def test_bf16_relative_error_and_round_to_nearest_even(x):
    y = Bf16Codec().decode(Bf16Codec().encode(x), x.size)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    normal = np.abs(x64) >= np.finfo(np.float32).smallest_normal
    ok = np.abs(y64 - x64) <= 2.0**-8 * np.abs(x64)
    assert np.all(ok[normal])
    assert np.all(np.isfinite(y))
    # The result is one of the two bfloat16 neighbours, the nearer one, ties to even.
    bits = x.view(np.uint32)
    low, high = bits & 0xFFFF0000, (bits & 0xFFFF0000) + 0x10000
    kept = y.view(np.uint32)
    fits = (kept == low) | (kept == high) | (np.abs(y64) == float.fromhex("0x1.fep127"))
    assert np.all(fits)


def test_bf16_ties_round_to_even_and_saturate():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0xFF7FFFFF], np.uint32)
    y = Bf16Codec().decode(Bf16Codec().encode(bits.view(np.float32)), 5).view(np.uint32)
    assert [hex(v) for v in y] == [
        "0x3f800000",  # tie, kept half even: stays
        "0x3f820000",  # tie, kept half odd: rounds up
        "0x3f810000",  # just past the tie: rounds up
        "0x7f7f0000",  # would round to infinity: saturates
        "0xff7f0000",
    ]


@pytest.mark.parametrize("block", [256, 64, 1000])
def test_int8_relative_l2_for_gaussian_data(block):
    x = gaussian(100_003, seed=block)
    codec = Int8BlockCodec(block)
    y = codec.decode(codec.encode(x), x.size)
    assert np.linalg.norm(y - x) / np.linalg.norm(x) <= 0.01


@settings(deadline=None)
@given(
    hnp.arrays(
        np.float32, st.integers(1, 700), elements=st.floats(-(2.0**126), 2.0**126, width=32)
    ),
    st.sampled_from([1, 7, 256]),
)
def test_int8_error_bounded_by_block_absmax(x, block):
    assert_error_within_half_a_level(Int8BlockCodec(block), x, block, 127, 1.5e-36)


def assert_error_within_half_a_level(codec, x, block, levels, floor):
    """Each value decodes within half a quantisation level (``absmax / levels`` of its block)
    of itself, up to ``floor`` for values at the bottom of float32's range."""
    y = codec.decode(codec.encode(x), x.size).astype(np.float64)
    x64 = x.astype(np.float64)
    for start in range(0, x.size, block):
        xb, yb = x64[start : start + block], y[start : start + block]
        absmax = np.abs(xb).max()
        assert np.all(np.abs(yb - xb) <= absmax / (2 * levels) * (1 + 1e-5) + floor)


def test_int8_layout_is_scales_then_values():
    x = np.array([1.0, -2.0, 0.5, 0.0, 0.0], np.float32)
    data = Int8BlockCodec(3).encode(x)
    scales = np.frombuffer(data[:8], "<f4")
    values = np.frombuffer(data[8:], np.int8)
    np.testing.assert_allclose(scales, [2.0 / 127, 0.0])
    assert values.tolist() == [64, -127, 32, 0, 0]


def test_int8_extremes_stay_finite():
    big = np.finfo(np.float32).max
    x = np.array([big, -big, big / 2, 1.0, 1e-37, -1e-40, 0.0, 3e-45], np.float32)
    codec = Int8BlockCodec(2)
    y = codec.decode(codec.encode(x), x.size)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y[:3], x[:3], rtol=1 / 127)
    assert np.all(np.abs(y[4:]) <= 1e-36)


@pytest.mark.parametrize("scale", [np.nan, np.inf, -1.0, np.finfo(np.float32).max / 100])
def test_int8_refuses_invalid_scale(scale):
    codec = Int8BlockCodec(4)
    data = bytearray(codec.encode(np.ones(8, np.float32)))
    data[4:8] = np.float32(scale).tobytes()
    with pytest.raises(ProtocolViolation) as err:
        codec.decode(bytes(data), 8)
    assert err.value.code == RejectCode.INVALID_FIELD


@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "int8", "int4"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encoders_refuse_non_finite_input(name, bad):
    x = gaussian(300)
    x[17] = bad
    with pytest.raises(ValueError):
        CODECS[name].encode(x)


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("none", np.array([1.0, np.nan], "<f4").tobytes()),
        ("none", np.array([np.inf, 1.0], "<f4").tobytes()),
        ("fp16", np.array([1.0, -np.inf], "<f2").tobytes()),
        ("bf16", np.array([0x3F80, 0x7FC0], "<u2").tobytes()),
        ("bf16", np.array([0xFF80, 0x3F80], "<u2").tobytes()),
    ],
)
def test_decoders_refuse_non_finite_values(name, payload):
    with pytest.raises(ProtocolViolation) as err:
        CODECS[name].decode(payload, 2)
    assert err.value.code == RejectCode.INVALID_FIELD


def test_decode_accepts_any_buffer():
    x = gaussian(513)
    for codec in CODECS.values():
        data = codec.encode(x)
        for buf in (bytearray(data), memoryview(data)):
            np.testing.assert_array_equal(codec.decode(buf, x.size), codec.decode(data, x.size))


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8"])
def test_error_feedback_removes_the_bias_of_the_running_sum(name):
    codec = CODECS[name]
    rng = np.random.default_rng(7)
    # A fixed offset plus noise: a deterministic quantiser without feedback drops the same
    # part of the offset every round, so its error grows linearly.
    offset = rng.standard_normal(2048).astype(np.float32) * 1e-3 + 1.0
    ef = BufferErrorFeedback(codec, 2048)
    sum_in = np.zeros(2048)
    sum_ef = np.zeros(2048)
    sum_plain = np.zeros(2048)
    rounds = 300
    for _ in range(rounds):
        x = offset + rng.standard_normal(2048).astype(np.float32) * 1e-2
        sum_in += x
        sum_ef += codec.decode(ef.encode(x, 0), x.size)
        sum_plain += codec.decode(codec.encode(x), x.size)
        # The identity behind error feedback: what was sent is what came in minus the
        # residual still held back.
    residual = ef.residual()
    assert residual is not None
    np.testing.assert_allclose(sum_ef, sum_in - residual, rtol=0, atol=1e-3)
    ef_error = np.linalg.norm(sum_ef - sum_in) / np.linalg.norm(sum_in)
    plain_error = np.linalg.norm(sum_plain - sum_in) / np.linalg.norm(sum_in)
    assert ef_error < 1e-4
    assert ef_error < plain_error / 10


def test_error_feedback_keeps_contribution_and_result_residuals_apart_by_position():
    ef = BufferErrorFeedback(Int8BlockCodec(), 1000)
    assert ef.residual() is None and ef.residual("result") is None
    ef.encode(gaussian(300, 1), 0)
    ef.encode_result(gaussian(100, 2), 500)
    contribution, result = ef.residual(), ef.residual("result")
    assert contribution is not None and result is not None
    assert contribution.shape == result.shape == (1000,)
    # Each residual holds only the elements its kind encoded, where they lie in the vector.
    assert np.any(contribution[:300]) and not np.any(contribution[300:])
    assert np.any(result[500:600]) and not np.any(result[:500]) and not np.any(result[600:])
    with pytest.raises(ValueError):
        ef.encode(gaussian(200), 900)  # beyond the vector
    ef.reset()
    assert ef.residual() is None and ef.residual("result") is None


def test_error_feedback_keeps_residual_on_refused_input():
    ef = BufferErrorFeedback(Fp16Codec(), 64)
    ef.encode(gaussian(64), 0)
    before = ef.residual()
    bad = gaussian(64)
    bad[3] = np.nan
    with pytest.raises(ValueError):
        ef.encode(bad, 0)
    np.testing.assert_array_equal(ef.residual(), before)
