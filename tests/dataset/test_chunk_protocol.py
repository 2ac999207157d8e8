"""The chunk protocol's core without sockets: requests judged, serve slots counted, and a
chunk's frames pushed through the fetcher's checks, encoded and framed as on a stream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dandelion_p2p.dataset.chunk_protocol import (
    MIN_PART_BYTES,
    ChunkReceiver,
    LargerThanExpected,
    ServeLimits,
    ServeSlots,
    chunk_to_serve,
    transfer_deadline,
)
from dandelion_p2p.dataset.chunks import chunk_hash
from dandelion_p2p.dataset.messages import (
    DATASET,
    MAX_PART_FRAME,
    PART_BYTES,
    ChunkHeader,
    ChunkPart,
    GetChunk,
    LeaseRequest,
)
from dandelion_p2p.errors import ProtocolViolation, RejectCode, RemoteRejected
from dandelion_p2p.networks import public_network_of as network_prefix
from dandelion_p2p.wire import FrameDecoder, Message, Reject, decode, encode, encode_frame

DATA = bytes(range(256)) * 9000  # a little over two parts
NAME = chunk_hash(DATA)


class Shelf:
    """A chunk source that remembers what it was asked for."""

    def __init__(self, held: dict[str, Path | bytes]) -> None:
        self.held = held
        self.asked: list[str] = []

    def __call__(self, name: str) -> Path | bytes | None:
        self.asked.append(name)
        return self.held.get(name)


def code_of(exc: pytest.ExceptionInfo[ProtocolViolation]) -> RejectCode:
    return exc.value.code


def test_requests_are_judged_before_anything_is_looked_up() -> None:
    shelf = Shelf({NAME: DATA})
    assert chunk_to_serve(GetChunk(chunk=NAME), shelf) == (NAME, DATA)
    for name in ("../../etc/passwd", NAME.upper(), NAME + "/../x", "/etc/shadow"):
        with pytest.raises(ProtocolViolation) as exc:
            chunk_to_serve(GetChunk(chunk=name), shelf)
        assert code_of(exc) == RejectCode.INVALID_FIELD
    assert shelf.asked == [NAME]
    with pytest.raises(ProtocolViolation) as exc:
        chunk_to_serve(GetChunk(chunk="ab" * 32), shelf)
    assert code_of(exc) == RejectCode.NOT_FOUND
    with pytest.raises(ProtocolViolation) as exc:
        chunk_to_serve(LeaseRequest(run="x"), shelf)
    assert code_of(exc) == RejectCode.UNKNOWN_TYPE


def test_network_prefixes_group_public_addresses_only() -> None:
    assert network_prefix("8.8.8.8") == "8.8.8.0/24"
    assert network_prefix("8.8.8.200") == network_prefix("8.8.8.1")
    assert network_prefix("8.8.9.1") != network_prefix("8.8.8.1")
    assert network_prefix("2001:4860:4860::8888") == "2001:4860:4860::/48"
    for local in ("127.0.0.1", "10.0.0.3", "192.168.1.9", "::1", "fe80::1", "not an ip"):
        assert network_prefix(local) is None


def _refusal(slots: ServeSlots, peer: bytes, prefix: str | None) -> str:
    with pytest.raises(ProtocolViolation) as exc:
        slots.take(peer, prefix)
    assert code_of(exc) == RejectCode.RATE_LIMITED
    return exc.value.detail


def test_serve_slots_are_bounded_per_peer_per_prefix_and_in_total() -> None:
    slots = ServeSlots(ServeLimits(total=5, per_peer=2, per_prefix=3))
    net = network_prefix("8.8.8.8")
    slots.take(b"a", net)
    slots.take(b"a", net)
    assert "already sending you 2" in _refusal(slots, b"a", net)
    slots.take(b"b", net)
    assert "peers of your network" in _refusal(slots, b"c", net)
    slots.take(b"c", None)  # a peer on a LAN or behind a relay counts on its own
    slots.take(b"d", network_prefix("9.9.9.9"))
    assert "too many" in _refusal(slots, b"e", None)
    assert slots.in_use == 5

    slots.give_back(b"a", net)
    slots.take(b"e", None)
    slots.give_back(b"e", None)
    slots.give_back(b"a", net)
    assert slots.held_by(b"a") == 0
    for peer, prefix in ((b"b", net), (b"c", None), (b"d", network_prefix("9.9.9.9"))):
        slots.give_back(peer, prefix)
    assert slots.in_use == 0
    for peer in (b"x", b"y", b"z"):
        slots.take(peer, net)


def frames_of(name: str, data: bytes, part: int = PART_BYTES) -> list[bytes]:
    """What a holder writes for ``data``: a header, then parts, each a frame."""
    messages: list[Message] = [ChunkHeader(chunk=name, size=len(data))]
    messages += [ChunkPart(data=data[i:i + part]) for i in range(0, len(data), part)]
    return [_frame(m) for m in messages]


def _frame(msg: Message) -> bytes:
    return encode_frame(encode(msg), MAX_PART_FRAME)


def receive(receiver: ChunkReceiver, stream: bytes, piece: int = 4096) -> bytes:
    """Feed the fetcher's end ``stream`` in small pieces, as reads would deliver it."""
    decoder = FrameDecoder(MAX_PART_FRAME)
    messages: Iterator[Message] = (
        decode(frame, DATASET)
        for start in range(0, len(stream), piece)
        for frame in _fed(decoder, stream[start:start + piece])
    )
    receiver.receive_header(next(messages))
    while not receiver.complete:
        receiver.receive_part(next(messages))
    return receiver.result()


def _fed(decoder: FrameDecoder, data: bytes) -> Iterator[bytes]:
    decoder.feed(data)
    yield from decoder.frames()


def test_a_chunk_sent_in_parts_arrives_whole_and_verified() -> None:
    assert receive(ChunkReceiver(NAME), b"".join(frames_of(NAME, DATA))) == DATA
    assert receive(ChunkReceiver(NAME, expected_size=len(DATA)),
                   b"".join(frames_of(NAME, DATA, part=MIN_PART_BYTES))) == DATA


def _fails(frames: list[bytes], expected_size: int | None = None) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as exc:
        receive(ChunkReceiver(NAME, expected_size), b"".join(frames))
    return exc.value


def test_altered_padded_or_trickled_chunks_are_violations() -> None:
    flipped = bytearray(DATA)
    flipped[len(flipped) // 2] ^= 1
    assert "do not hash" in _fails(frames_of(NAME, bytes(flipped))).detail

    header, *parts = frames_of(NAME, DATA)
    tail = DATA[-(len(DATA) % PART_BYTES):]
    overlong = [header, *parts[:-1], _frame(ChunkPart(data=tail + b"x"))]
    assert _fails(overlong).code == RejectCode.TOO_LARGE

    tiny = frames_of(NAME, DATA, part=MIN_PART_BYTES - 1)
    assert _fails(tiny).code == RejectCode.INVALID_FIELD

    other = chunk_hash(b"another chunk")
    assert _fails(frames_of(other, DATA)).code == RejectCode.UNEXPECTED
    twice = [header, header]
    assert _fails(twice).code == RejectCode.UNEXPECTED

    too_big = _fails(frames_of(NAME, DATA), expected_size=len(DATA) - 1)
    assert isinstance(too_big, LargerThanExpected) and too_big.code == RejectCode.TOO_LARGE


def test_a_refusal_and_a_bad_name_never_get_as_far_as_bytes() -> None:
    receiver = ChunkReceiver(NAME)
    with pytest.raises(RemoteRejected) as exc:
        receiver.receive_header(Reject(code=int(RejectCode.NOT_FOUND), detail="no"))
    assert exc.value.code == RejectCode.NOT_FOUND
    with pytest.raises(ProtocolViolation) as bad:
        ChunkReceiver("../" + NAME)
    assert bad.value.code == RejectCode.INVALID_FIELD


def test_transfer_deadlines_grow_with_size() -> None:
    assert transfer_deadline(0) == 30.0
    assert transfer_deadline(256 * 1024 * 10) == pytest.approx(40.0)
    assert transfer_deadline(1 << 20, min_rate=1 << 20, grace=0.5) == pytest.approx(1.5)
