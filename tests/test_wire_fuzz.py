"""Property tests of the wire format: hostile input only ever ends in ``ProtocolViolation``.

Anything ``decode`` accepts must also print, re-encode, and decode to the same bytes again, so a
receiver can log, store and forward what it accepted without tripping over it later.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.wire import (
    WIRE_VERSION,
    FrameDecoder,
    Message,
    Reject,
    RejectCode,
    decode,
    encode,
    encode_frame,
)
from dandelion_p2p.wire.framing import HEADER
from tests.test_wire import VECTORS, Point, Route, Scalars, Settings

MAX_FRAME = 4096

# Enough examples to find the easy breaks on every run while the suite stays fast.
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- valid messages -----------------------------------------------------------------------

int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
any_msgpack_int = st.integers(min_value=-(2**63), max_value=2**64 - 1)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
short_text = st.text(max_size=24)
short_bytes = st.binary(max_size=48)

free_form_values = st.recursive(
    st.none() | st.booleans() | any_msgpack_int | finite_floats | short_text | short_bytes,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(short_text, children, max_size=4)
    ),
    max_leaves=16,
)

points = st.builds(Point, x=int64, y=int64)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Reject, code=st.integers(1, 2**16 - 1), detail=st.text(max_size=512)),
    st.builds(
        Scalars,
        count=st.integers(0, 2**64 - 1),
        offset=int64,
        ratio=finite_floats,
        label=short_text,
        payload=short_bytes,
        enabled=st.booleans(),
    ),
    points,
    st.builds(
        Route,
        chunks=st.lists(short_bytes, max_size=4).map(tuple),
        start=points,
        stops=st.lists(points, max_size=4).map(tuple),
        comment=st.none() | short_text,
        hops=st.none() | int64,
    ),
    st.builds(Settings, values=st.dictionaries(short_text, free_form_values, max_size=4)),
)


def decode_or_violation(payload: bytes) -> Message | None:
    """Decode hostile bytes; ``None`` stands for a ``ProtocolViolation``, anything else fails."""
    try:
        message = decode(payload, VECTORS)
    except ProtocolViolation as violation:
        assert isinstance(violation.code, RejectCode)
        return None
    # Compared as bytes: a free-form map may hold NaN, which is never equal to itself.
    canonical = encode(message)
    assert encode(decode(canonical, VECTORS)) == canonical
    repr(message)
    return message


@FUZZ
@given(messages)
def test_encode_decode_round_trip(message: Message) -> None:
    payload = encode(message)
    decoded = decode(payload, VECTORS)
    assert type(decoded) is type(message)
    assert decoded == message
    assert encode(decoded) == payload


# --- hostile payloads ---------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes(payload: bytes) -> None:
    decode_or_violation(payload)


# Values msgpack can carry, including what the schema forbids: NaN, bin keys, wide ints.
any_value = st.recursive(
    st.none() | st.booleans() | any_msgpack_int | st.floats() | short_text | short_bytes,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(short_text | short_bytes, children, max_size=5)
    ),
    max_leaves=12,
)


@FUZZ
@given(any_value)
def test_random_msgpack_structure(value: Any) -> None:
    decode_or_violation(msgpack.packb(value, use_bin_type=True))


field_names = st.sampled_from(
    sorted({field.name for cls in VECTORS.types.values() for field in dataclasses.fields(cls)})
)


@FUZZ
@given(
    version=st.sampled_from([WIRE_VERSION, WIRE_VERSION, WIRE_VERSION, 0, 2, True, 1.0, "1"]),
    type_id=st.sampled_from([*VECTORS.types, -1, 99, False, "1"]),
    body=st.dictionaries(field_names | short_text, any_value, max_size=4),
)
def test_random_envelope(version: Any, type_id: Any, body: dict[str, Any]) -> None:
    decode_or_violation(msgpack.packb([version, type_id, body], use_bin_type=True))


@FUZZ
@given(messages, st.data())
def test_valid_body_with_one_field_changed(message: Message, data: st.DataObject) -> None:
    body = message.to_body()
    name = data.draw(st.sampled_from(sorted(body)))
    action = data.draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "replace":
        body[name] = data.draw(any_value)
    elif action == "drop":
        del body[name]
    else:
        body[data.draw(short_text)] = data.draw(any_value)
    decode_or_violation(msgpack.packb([WIRE_VERSION, message.TYPE, body], use_bin_type=True))


@FUZZ
@given(messages, st.data())
def test_truncated_payload_is_malformed(message: Message, data: st.DataObject) -> None:
    payload = encode(message)
    cut = data.draw(st.integers(0, len(payload) - 1))
    # msgpack objects delimit themselves, so no strict prefix of an envelope is a whole object.
    try:
        decode(payload[:cut], VECTORS)
    except ProtocolViolation as violation:
        assert violation.code is RejectCode.MALFORMED
    else:
        raise AssertionError(f"a {cut}-byte prefix of a {len(payload)}-byte envelope decoded")


def receive_all(stream: bytes) -> list[Message | None]:
    """Frame and decode a whole stream; framing violations end it, as they would a real one."""
    decoder = FrameDecoder(MAX_FRAME)
    received: list[Message | None] = []
    try:
        decoder.feed(stream)
        received.extend(decode_or_violation(frame) for frame in decoder.frames())
    except ProtocolViolation as violation:
        assert violation.code in (RejectCode.MALFORMED, RejectCode.TOO_LARGE)
    return received


@FUZZ
@given(messages, st.data())
def test_bit_flipped_frame(message: Message, data: st.DataObject) -> None:
    frame = bytearray(encode_frame(encode(message), MAX_FRAME))
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, len(frame) * 8 - 1))
        frame[bit // 8] ^= 1 << (bit % 8)
    receive_all(bytes(frame))


@FUZZ
@given(messages, st.data())
def test_truncated_frame_stays_pending(message: Message, data: st.DataObject) -> None:
    frame = encode_frame(encode(message), MAX_FRAME)
    cut = data.draw(st.integers(0, len(frame) - 1))
    decoder = FrameDecoder(MAX_FRAME)
    decoder.feed(frame[:cut])
    assert list(decoder.frames()) == []
    assert decoder.pending == cut


# --- framing ------------------------------------------------------------------------------

payload_lists = st.lists(st.binary(min_size=1, max_size=300), max_size=8)


@FUZZ
@given(payload_lists, st.data())
def test_random_chunking_reproduces_the_frames(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(p, MAX_FRAME) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder = FrameDecoder(MAX_FRAME)
    received: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoder.feed(stream[start:end])
        received.extend(decoder.frames())
    assert received == payloads
    assert decoder.pending == 0


@FUZZ
@given(payload_lists, st.data())
def test_chunked_stream_cut_short_leaves_the_rest_pending(
    payloads: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(encode_frame(p, MAX_FRAME) for p in payloads)
    end = data.draw(st.integers(0, len(stream)))
    chunk = data.draw(st.integers(1, 64))
    decoder = FrameDecoder(MAX_FRAME)
    received: list[bytes] = []
    for start in range(0, end, chunk):
        decoder.feed(stream[start : min(start + chunk, end)])
        received.extend(decoder.frames())
    assert received == payloads[: len(received)]
    consumed = sum(len(p) + HEADER.size for p in received)
    assert decoder.pending == end - consumed
    if len(received) < len(payloads):
        assert decoder.pending < len(payloads[len(received)]) + HEADER.size


@FUZZ
@given(st.integers(MAX_FRAME + 1, 2**32 - 1), st.integers(0, HEADER.size - 1))
def test_oversize_is_refused_once_the_header_is_complete(length: int, split: int) -> None:
    header = HEADER.pack(length)
    decoder = FrameDecoder(MAX_FRAME)
    decoder.feed(header[:split])
    try:
        decoder.feed(header[split:])
    except ProtocolViolation as violation:
        assert violation.code is RejectCode.TOO_LARGE
    else:
        raise AssertionError("an oversized length was accepted")
