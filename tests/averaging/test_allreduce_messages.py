"""Data-plane frames and headers of the averaging protocol."""

from __future__ import annotations

import dataclasses
import struct

import msgpack
import pytest

from dandelion_p2p.averaging import messages as m
from dandelion_p2p.averaging.messages import (
    ChunkHeader,
    ResultHeader,
    pack_frame,
    payload_digest,
    unpack_frame,
    verify_chunk,
    verify_result,
)
from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.identity import Identity
from dandelion_p2p.wire import Reject, RejectCode, encode

A = Identity.from_seed(b"\x01" * 32)
B = Identity.from_seed(b"\x02" * 32)
PAYLOAD = bytes(range(256)) * 16


def chunk_header(**changes) -> ChunkHeader:
    fields = dict(
        run=b"run",
        round=3,
        group_id=b"\x11" * 32,
        span_index=1,
        chunk_index=2,
        start=1024,
        end=2048,
        sender=A.peer_id_bytes,
        recipient=B.peer_id_bytes,
        codec="none",
        weight=12.5,
        digest=payload_digest(PAYLOAD),
    )
    fields.update(changes)
    return ChunkHeader(**fields, signature=m.UNSIGNED).signed_with(A.sign)


def result_header(**changes) -> ResultHeader:
    contributors = tuple(sorted([A.peer_id_bytes, B.peer_id_bytes]))
    fields = dict(
        run=b"run",
        round=3,
        group_id=b"\x11" * 32,
        span_index=0,
        chunk_index=0,
        start=0,
        end=1024,
        reducer=B.peer_id_bytes,
        contributors=contributors,
        weights=(1.0, 2.0),
        codec="none",
        digest=payload_digest(PAYLOAD),
    )
    fields.update(changes)
    return ResultHeader(**fields, signature=m.UNSIGNED).signed_with(B.sign)


def test_frame_round_trip_without_copying_the_payload() -> None:
    header = chunk_header()
    payload = bytearray(PAYLOAD)
    buffers = pack_frame(header, payload)
    assert buffers[1] is payload
    frame = b"".join(buffers)
    assert struct.unpack(">I", frame[:4])[0] == len(encode(header))
    got, view = unpack_frame(frame)
    assert got == header and bytes(view) == PAYLOAD
    got2, view2 = unpack_frame(memoryview(frame))
    assert got2 == header and view2.nbytes == len(PAYLOAD)


def test_signatures_cover_every_field() -> None:
    header = chunk_header()
    assert verify_chunk(header)
    for name, value in [
        ("run", b"other"),
        ("round", 4),
        ("group_id", b"\x22" * 32),
        ("span_index", 0),
        ("chunk_index", 1),
        ("start", 0),
        ("end", 4096),
        ("recipient", A.peer_id_bytes + b"x"),
        ("codec", "fp16"),
        ("weight", 12.0),
        ("digest", b"\x00" * 32),
    ]:
        assert not verify_chunk(dataclasses.replace(header, **{name: value})), name
    res = result_header()
    assert verify_result(res)
    assert not verify_result(dataclasses.replace(res, weights=(2.0, 1.0)))
    assert not verify_result(
        dataclasses.replace(res, contributors=(B.peer_id_bytes,), weights=(1.0,))
    )
    # The domains keep a chunk signature from passing for anything else.
    assert m.CHUNK_DOMAIN != m.RESULT_DOMAIN


def test_signed_bytes_are_the_arrays_of_the_spec() -> None:
    """protocol/averaging.md section 6.5, spelled out: a field added, dropped or moved in a
    header class would change what every peer signs."""
    chunk = chunk_header()
    assert chunk.signed_bytes() == msgpack.packb(
        [
            b"dandelion/avg-chunk/v1", b"run", 3, b"\x11" * 32, 1, 2, 1024, 2048,
            A.peer_id_bytes, B.peer_id_bytes, "none", 12.5, payload_digest(PAYLOAD),
        ],
        use_bin_type=True,
    )
    result = result_header()
    assert result.signed_bytes() == msgpack.packb(
        [
            b"dandelion/avg-result/v1", b"run", 3, b"\x11" * 32, 0, 0, 0, 1024,
            B.peer_id_bytes, list(result.contributors), [1.0, 2.0], "none",
            payload_digest(PAYLOAD),
        ],
        use_bin_type=True,
    )


def test_integer_weights_are_signed_as_the_floats_the_receiver_decodes() -> None:
    chunk = chunk_header(weight=12)
    assert chunk.signed_bytes() == chunk_header(weight=12.0).signed_bytes()
    decoded, _ = unpack_frame(b"".join(pack_frame(chunk, PAYLOAD)))
    assert isinstance(decoded, ChunkHeader) and verify_chunk(decoded)
    result = result_header(weights=(1, 2))
    assert result.signed_bytes() == result_header().signed_bytes()


@pytest.mark.parametrize(
    "changes",
    [
        {"group_id": b"\x11" * 31},
        {"start": 10, "end": 10},
        {"end": m.MAX_ELEMENTS + 1},
        {"weight": 0.0},
        {"codec": ""},
        {"recipient": A.peer_id_bytes},
        {"span_index": m.MAX_GROUP_SIZE},
        {"run": b""},
        {"round": -1},
    ],
)
def test_chunk_header_rules(changes) -> None:
    with pytest.raises(ProtocolViolation) as err:
        chunk_header(**changes)
    assert err.value.code == RejectCode.INVALID_FIELD


@pytest.mark.parametrize(
    "changes",
    [
        {"contributors": (), "weights": ()},
        {"contributors": (A.peer_id_bytes,), "weights": (1.0,)},  # reducer missing
        {"weights": (1.0,)},
        {"weights": (1.0, -2.0)},
        {"contributors": (B.peer_id_bytes, B.peer_id_bytes)},
    ],
)
def test_result_header_rules(changes) -> None:
    with pytest.raises(ProtocolViolation):
        result_header(**changes)


def frame_with(head: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(head)) + head + payload


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"", RejectCode.MALFORMED),
        (b"\x00\x00\x00", RejectCode.MALFORMED),
        (b"\x00\x00\x00\x00", RejectCode.MALFORMED),
        (struct.pack(">I", m.MAX_HEADER + 1) + b"x", RejectCode.TOO_LARGE),
        (struct.pack(">I", 100) + b"x" * 50, RejectCode.MALFORMED),
        (frame_with(b"\xc1"), RejectCode.MALFORMED),
        (frame_with(msgpack.packb([2, 2, {}])), RejectCode.UNSUPPORTED_VERSION),
        (frame_with(msgpack.packb([1, 99, {}])), RejectCode.UNKNOWN_TYPE),
        (frame_with(msgpack.packb([1, 2, {"run": b"x"}])), RejectCode.INVALID_FIELD),
        (frame_with(encode(Reject(code=1)), b"junk"), RejectCode.MALFORMED),
    ],
)
def test_unpack_frame_refuses_before_decoding(frame: bytes, code: RejectCode) -> None:
    with pytest.raises(ProtocolViolation) as err:
        unpack_frame(frame)
    assert err.value.code == code


def test_announcement_is_not_a_data_plane_frame() -> None:
    ann = m.AveragingAnnouncement(
        run=b"r",
        round=1,
        weight=1.0,
        bandwidth_mbps=1.0,
        accepts_connections=True,
        endpoint="",
        expires_at_ms=1,
    )
    with pytest.raises(ProtocolViolation) as err:
        unpack_frame(b"".join(pack_frame(ann)))
    assert err.value.code == RejectCode.UNKNOWN_TYPE
    with pytest.raises(ProtocolViolation):
        m.decode_announcement(encode(chunk_header()))


def test_pack_frame_refuses_what_the_receiver_would() -> None:
    big = result_header()
    with pytest.raises(ValueError):
        pack_frame(big, memoryview(bytearray(m.MAX_FRAME)))


def test_reject_frame_has_no_payload() -> None:
    frame = b"".join(pack_frame(Reject(code=int(RejectCode.TIMEOUT))))
    header, payload = unpack_frame(frame)
    assert isinstance(header, Reject) and payload.nbytes == 0


def test_channel_hello_round_trips_as_a_frame_of_the_family() -> None:
    hello = m.ChannelHello(run=b"run", round=7, group_id=bytes(32))
    frame = m.encode_hello(hello)
    assert frame[:4] == struct.pack(">I", len(frame) - 4)
    assert m.decode_hello(frame) == hello
    # read only as a channel's first frame: never as a chunk or result
    with pytest.raises(ProtocolViolation) as exc:
        m.unpack_frame(frame)
    assert exc.value.code == RejectCode.UNKNOWN_TYPE


def _hello_frame(body: dict[str, object], type_id: int = 4) -> bytes:
    head = msgpack.packb([1, type_id, body], use_bin_type=True)
    return struct.pack(">I", len(head)) + head


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x00" * 257, RejectCode.TOO_LARGE),
        (b"\x00\x00", RejectCode.MALFORMED),
        # the bare [run, round, group_id] array of earlier releases is not a frame
        (msgpack.packb([b"run", 1, bytes(32)], use_bin_type=True), RejectCode.MALFORMED),
        (m.encode_hello(m.ChannelHello(b"run", 1, bytes(32))) + b"x", RejectCode.MALFORMED),
        (_hello_frame({"run": b"run", "round": True, "group_id": bytes(32)}),
         RejectCode.INVALID_FIELD),
        (_hello_frame({"run": b"run", "round": 1, "group_id": bytes(31)}),
         RejectCode.INVALID_FIELD),
        (_hello_frame({"run": b"", "round": 1, "group_id": bytes(32)}),
         RejectCode.INVALID_FIELD),
        (_hello_frame({"run": b"run", "round": -1, "group_id": bytes(32)}),
         RejectCode.INVALID_FIELD),
        (_hello_frame({"code": 1, "detail": ""}, type_id=0), RejectCode.UNKNOWN_TYPE),
    ],
)
def test_channel_hello_is_checked_like_every_frame(frame: bytes, code: RejectCode) -> None:
    with pytest.raises(ProtocolViolation) as exc:
        m.decode_hello(frame)
    assert exc.value.code == code
