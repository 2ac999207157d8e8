"""Wire format: the shared test vectors, and the frame decoder fed in awkward pieces.

The ``vectors`` family below exists only for the vectors in ``protocol/vectors/wire.json``;
``protocol/vectors/generate_wire.py`` builds that file from these definitions.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.wire import (
    WIRE_VERSION,
    FrameDecoder,
    Message,
    Registry,
    Reject,
    RejectCode,
    decode,
    encode,
    encode_frame,
    invalid,
)
from dandelion_p2p.wire.framing import ABSOLUTE_MAX_FRAME, HEADER
from dandelion_p2p.wire.schema import MAX_MAP_DEPTH

REPO_ROOT = Path(__file__).resolve().parents[1]
VECTORS_PATH = REPO_ROOT / "protocol" / "vectors" / "wire.json"
GENERATOR_PATH = REPO_ROOT / "protocol" / "vectors" / "generate_wire.py"
SPEC_PATH = REPO_ROOT / "protocol" / "wire.md"

# The frame limit the vectors are decoded under: small enough that an oversized frame and a frame
# exactly at the limit stay readable, large enough to pass msgpack's nesting limit of 1024.
MAX_FRAME = 2048

VECTORS = Registry("vectors")


@VECTORS.message(1)
class Scalars(Message):
    """One field of each scalar type; count must fit an unsigned 64-bit integer."""

    count: int
    offset: int
    ratio: float
    label: str
    payload: bytes
    enabled: bool

    def check(self) -> None:
        if not 0 <= self.count < 2**64:
            raise invalid("Scalars.count must be an unsigned 64-bit integer")


@VECTORS.message(2)
class Point(Message):
    """A small message to nest inside others."""

    x: int
    y: int


@VECTORS.message(3)
class Route(Message):
    """Arrays, nested messages, and optional fields that may be absent."""

    chunks: tuple[bytes, ...]
    start: Point
    stops: tuple[Point, ...]
    comment: str | None = None
    hops: int | None = None


@VECTORS.message(4)
class Settings(Message):
    """A free-form map."""

    values: dict[str, Any]


def as_json(value: Any) -> Any:
    """The JSON form the vectors use: bytes as hex, tuples as arrays, messages as field maps."""
    if isinstance(value, Message):
        return {f.name: as_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [as_json(item) for item in value]
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    return value


@functools.cache
def vector_file() -> dict[str, Any]:
    # Read when tests are collected rather than on import, so the generator can import the
    # definitions above even while wire.json is missing or stale.
    with VECTORS_PATH.open(encoding="utf-8") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for kind in ("valid", "invalid"):
        if f"{kind}_vector" in metafunc.fixturenames:
            vectors = vector_file()[kind]
            metafunc.parametrize(f"{kind}_vector", vectors, ids=[v["name"] for v in vectors])


def receive(frame: bytes) -> Message:
    """What a receiver does with bytes from a stream holding exactly one frame."""
    decoder = FrameDecoder(MAX_FRAME)
    decoder.feed(frame)
    payloads = list(decoder.frames())
    assert len(payloads) == 1, "a vector holds exactly one frame"
    assert decoder.pending == 0
    return decode(payloads[0], VECTORS)


# --- the vector file itself ---------------------------------------------------------------


def test_vector_file_header() -> None:
    header = vector_file()
    assert header["wire_version"] == WIRE_VERSION
    assert header["family"] == VECTORS.family
    assert header["max_frame"] == MAX_FRAME <= ABSOLUTE_MAX_FRAME
    assert {entry["type_id"]: entry["name"] for entry in header["types"]} == {
        type_id: cls.__name__ for type_id, cls in VECTORS.types.items()
    }


def test_vector_names_are_unique() -> None:
    names = [v["name"] for v in vector_file()["valid"] + vector_file()["invalid"]]
    assert len(names) == len(set(names))


def test_vectors_cover_every_type_and_the_wire_level_codes() -> None:
    valid, invalid = vector_file()["valid"], vector_file()["invalid"]
    assert {v["type"] for v in valid} == {cls.__name__ for cls in VECTORS.types.values()}
    assert {v["reject"] for v in invalid} >= {
        "MALFORMED",
        "TOO_LARGE",
        "UNSUPPORTED_VERSION",
        "UNKNOWN_TYPE",
        "INVALID_FIELD",
    }


def test_vector_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("generate_wire", GENERATOR_PATH)
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.render() == VECTORS_PATH.read_text(encoding="utf-8"), (
        "protocol/vectors/wire.json is stale; run protocol/vectors/generate_wire.py"
    )


# --- valid vectors ------------------------------------------------------------------------


def test_valid_vector_decodes_to_the_expected_message(valid_vector: dict[str, Any]) -> None:
    vector = valid_vector
    message = receive(bytes.fromhex(vector["frame"]))
    assert vector["family"] == VECTORS.family
    assert type(message).__name__ == vector["type"]
    # Compared as JSON text so that 1 vs 1.0 and 0.0 vs -0.0 count as different.
    assert json.dumps(as_json(message)) == json.dumps(vector["fields"])


def test_valid_vector_reencodes_to_its_canonical_bytes(valid_vector: dict[str, Any]) -> None:
    vector = valid_vector
    message = receive(bytes.fromhex(vector["frame"]))
    canonical = vector.get("canonical_frame", vector["frame"])
    assert encode_frame(encode(message), MAX_FRAME).hex() == canonical
    assert receive(bytes.fromhex(canonical)) == message


# --- invalid vectors ----------------------------------------------------------------------


def test_invalid_vector_is_rejected_with_its_code(invalid_vector: dict[str, Any]) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        receive(bytes.fromhex(invalid_vector["frame"]))
    assert caught.value.code is RejectCode[invalid_vector["reject"]], caught.value.detail


# --- the spec stays true to the code ------------------------------------------------------


def test_spec_reject_table_matches_the_codes() -> None:
    rows = re.findall(
        r"^\|\s*(\d+)\s*\|\s*`(\w+)`\s*\|\s*(.+?)\s*\|$",
        SPEC_PATH.read_text(encoding="utf-8"),
        re.M,
    )
    assert [(int(value), name, meaning) for value, name, meaning in rows] == [
        (code.value, code.name, code.meaning) for code in RejectCode
    ]


# --- messages -----------------------------------------------------------------------------


def test_reject_is_type_zero_of_every_family() -> None:
    assert VECTORS.types[0] is Reject
    assert Registry("another").types[0] is Reject


def test_encoding_writes_every_field_in_declaration_order() -> None:
    body = Route(chunks=(), start=Point(1, 2), stops=()).to_body()
    assert list(body) == ["chunks", "start", "stops", "comment", "hops"]
    assert body["comment"] is None


def test_free_form_map_nesting_is_bounded() -> None:
    deepest: Any = 1
    for _ in range(MAX_MAP_DEPTH - 1):
        deepest = [deepest]
    accepted = Settings(values={"deep": deepest})
    assert decode(encode(accepted), VECTORS) == accepted
    too_deep = Settings(values={"deep": [deepest]})
    with pytest.raises(ProtocolViolation) as caught:
        decode(encode(too_deep), VECTORS)
    assert caught.value.code is RejectCode.INVALID_FIELD


# --- framing ------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    return encode_frame(payload, MAX_FRAME)


def test_encode_frame_refuses_what_a_receiver_would_refuse() -> None:
    with pytest.raises(ValueError):
        encode_frame(b"", MAX_FRAME)
    with pytest.raises(ValueError):
        encode_frame(b"x" * (MAX_FRAME + 1), MAX_FRAME)
    assert encode_frame(b"x" * MAX_FRAME, MAX_FRAME)[:4] == HEADER.pack(MAX_FRAME)


@pytest.mark.parametrize("max_size", [0, -1, ABSOLUTE_MAX_FRAME + 1])
def test_frame_decoder_limit_must_be_within_the_absolute_max(max_size: int) -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_size)


def test_frame_decoder_byte_by_byte() -> None:
    payloads = [b"a", b"bc" * 100, bytes(range(256))]
    stream = b"".join(frame(p) for p in payloads)
    decoder = FrameDecoder(MAX_FRAME)
    received: list[bytes] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        received.extend(decoder.frames())
    assert received == payloads
    assert decoder.pending == 0


def test_frame_decoder_several_frames_in_one_feed() -> None:
    payloads = [b"one", b"two", b"three"]
    decoder = FrameDecoder(MAX_FRAME)
    decoder.feed(b"".join(frame(p) for p in payloads))
    assert list(decoder.frames()) == payloads
    assert decoder.pending == 0
    assert list(decoder.frames()) == []


def test_frame_decoder_refuses_oversize_from_the_header_alone() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    decoder.feed(HEADER.pack(MAX_FRAME + 1)[:3])
    assert decoder.pending == 3
    with pytest.raises(ProtocolViolation) as caught:
        decoder.feed(HEADER.pack(MAX_FRAME + 1)[3:])
    assert caught.value.code is RejectCode.TOO_LARGE


def test_frame_decoder_refuses_oversize_header_behind_a_good_frame() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    decoder.feed(frame(b"fine") + HEADER.pack(ABSOLUTE_MAX_FRAME))
    frames = decoder.frames()
    assert next(frames) == b"fine"
    with pytest.raises(ProtocolViolation) as caught:
        next(frames)
    assert caught.value.code is RejectCode.TOO_LARGE


def test_frame_decoder_accepts_exactly_the_limit() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    decoder.feed(frame(b"x" * MAX_FRAME))
    assert list(decoder.frames()) == [b"x" * MAX_FRAME]


def test_frame_decoder_refuses_zero_length() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    with pytest.raises(ProtocolViolation) as caught:
        decoder.feed(HEADER.pack(0))
    assert caught.value.code is RejectCode.MALFORMED


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 9])
def test_frame_decoder_pending_shows_truncation(cut: int) -> None:
    whole = frame(b"123456")
    decoder = FrameDecoder(MAX_FRAME)
    decoder.feed(whole[:cut])
    assert list(decoder.frames()) == []
    # A stream that ends here ends mid-frame: the bytes are still pending.
    assert decoder.pending == cut
    decoder.feed(whole[cut:])
    assert list(decoder.frames()) == [b"123456"]
    assert decoder.pending == 0


def test_frame_decoder_pending_counts_a_partial_second_frame() -> None:
    decoder = FrameDecoder(MAX_FRAME)
    second = frame(b"second")
    decoder.feed(frame(b"first") + second[:6])
    assert list(decoder.frames()) == [b"first"]
    assert decoder.pending == 6
