"""Sealed framing without I/O: chunking, tampering, replay, limits, key derivation."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dandelion_p2p.dataplane import sealing
from dandelion_p2p.dataplane.errors import ChannelClosed
from dandelion_p2p.dataplane.sealing import (
    CONTROL_FLAG,
    HEADER,
    LABEL_ACCEPTOR,
    LABEL_OPENER,
    MAX_CONTROL_PAYLOAD,
    MAX_COUNTER,
    TAG_SIZE,
    FrameOpener,
    FrameSealer,
    OpenedFrame,
    SealedFrame,
    derive_keys,
    sealed_size,
)
from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation
from dandelion_p2p.wire import RejectCode

KEYS = derive_keys(bytes(32), bytes(16), b"opener-id", b"acceptor-id")
MAX_FRAME = 64 * 1024


def pair(max_frame: int = MAX_FRAME) -> tuple[FrameSealer, FrameOpener]:
    return (
        FrameSealer(KEYS.opener_to_acceptor, LABEL_OPENER),
        FrameOpener(KEYS.opener_to_acceptor, LABEL_OPENER, max_frame),
    )


def drain(opener: FrameOpener) -> list[OpenedFrame]:
    out = []
    while (frame := opener.next_frame()) is not None:
        if isinstance(frame, SealedFrame):
            payload = opener.open(frame)
            opener.recycle(frame)
            frame = OpenedFrame(False, payload)
        out.append(frame)
    return out


@contextlib.contextmanager
def own_buffers_from(size: int) -> Iterator[None]:
    """Send data frames of at least ``size`` bytes down the own-buffer path."""
    with mock.patch.object(sealing, "DIRECT_BODY_MIN", size):
        yield


thresholds = st.sampled_from([1, 100, 2000, sealing.DIRECT_BODY_MIN])


payloads = st.lists(
    st.tuples(st.booleans(), st.binary(min_size=1, max_size=3000)), min_size=1, max_size=8
).map(lambda items: [(c and len(p) <= MAX_CONTROL_PAYLOAD, p) for c, p in items])


def seal_all(sealer: FrameSealer, items: list[tuple[bool, bytes]]) -> list[bytes]:
    return [sealer.seal(p, control=c) for c, p in items]


@settings(max_examples=300, deadline=None)
@given(items=payloads, cuts=st.lists(st.integers(min_value=0, max_value=30_000), max_size=20),
       use_buffer=st.booleans(), threshold=thresholds)
def test_any_chunking_yields_the_same_frames(
    items: list[tuple[bool, bytes]], cuts: list[int], use_buffer: bool, threshold: int
) -> None:
    with own_buffers_from(threshold):
        check_chunking(items, cuts, use_buffer)


def check_chunking(items: list[tuple[bool, bytes]], cuts: list[int], use_buffer: bool) -> None:
    sealer, opener = pair()
    stream = b"".join(seal_all(sealer, items))
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    got: list[OpenedFrame] = []
    for lo, hi in itertools.pairwise(points):
        piece = stream[lo:hi]
        if use_buffer:
            # The socket path: write into the opener's own buffer, possibly in parts.
            while piece:
                view = opener.receive_buffer(1)
                n = min(len(view), len(piece))
                view[:n] = piece[:n]
                view.release()
                opener.commit(n)
                piece = piece[n:]
        else:
            opener.feed(piece)
        got.extend(drain(opener))
    assert got == [OpenedFrame(c, p) for c, p in items]
    opener.end_of_stream()
    assert opener.counter == sealer.counter == len(items)


@settings(max_examples=300, deadline=None)
@given(items=payloads, data=st.data(), threshold=thresholds)
def test_any_bit_flip_is_caught(
    items: list[tuple[bool, bytes]], data: st.DataObject, threshold: int
) -> None:
    with own_buffers_from(threshold):
        check_bit_flip(items, data)


def check_bit_flip(items: list[tuple[bool, bytes]], data: st.DataObject) -> None:
    sealer, opener = pair()
    frames = seal_all(sealer, items)
    stream = bytearray(b"".join(frames))
    position = data.draw(st.integers(min_value=0, max_value=len(stream) - 1))
    stream[position] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
    delivered: list[OpenedFrame] = []
    with pytest.raises((ProtocolViolation, PeerUnavailable)):
        opener.feed(stream)
        delivered.extend(drain(opener))
        # A flip that enlarged a length leaves the frame incomplete: caught as truncation.
        opener.end_of_stream()
    assert delivered == [OpenedFrame(c, p) for c, p in items[: len(delivered)]]
    assert len(delivered) < len(items)


@settings(max_examples=200, deadline=None)
@given(items=payloads.filter(lambda x: len(x) >= 2), data=st.data(), threshold=thresholds)
def test_replayed_reordered_or_dropped_frames_fail_authentication(
    items: list[tuple[bool, bytes]], data: st.DataObject, threshold: int
) -> None:
    with own_buffers_from(threshold):
        check_replay(items, data)


def check_replay(items: list[tuple[bool, bytes]], data: st.DataObject) -> None:
    sealer, opener = pair()
    frames = seal_all(sealer, items)
    k = data.draw(st.integers(min_value=0, max_value=len(frames) - 2))
    how = data.draw(st.sampled_from(["replay", "swap", "drop"]))
    if how == "replay":
        tampered = [*frames[:k + 1], frames[k], *frames[k + 1:]]
    elif how == "swap":
        tampered = [*frames[:k], frames[k + 1], frames[k], *frames[k + 2:]]
    else:
        tampered = frames[:k] + frames[k + 1 :]
    opener.feed(b"".join(tampered))
    delivered: list[OpenedFrame] = []
    with pytest.raises(ProtocolViolation) as caught:
        for frame in iter(opener.next_frame, None):
            if isinstance(frame, SealedFrame):
                opener.open(frame)
            delivered.append(frame)
    assert caught.value.code == RejectCode.BAD_SIGNATURE
    expected_intact = k + 1 if how == "replay" else k
    assert len(delivered) == expected_intact
    # A failed opener stays failed.
    with pytest.raises(ProtocolViolation):
        opener.next_frame()


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    _, opener = pair(max_frame=MAX_FRAME)
    opener.feed(HEADER.pack(MAX_FRAME + TAG_SIZE + 1))
    with pytest.raises(ProtocolViolation) as caught:
        opener.next_frame()
    assert caught.value.code == RejectCode.TOO_LARGE
    assert opener.buffered == 4


def test_control_frames_have_their_own_small_limit() -> None:
    _, opener = pair()
    opener.feed(HEADER.pack(CONTROL_FLAG | (MAX_CONTROL_PAYLOAD + 1 + TAG_SIZE)))
    with pytest.raises(ProtocolViolation) as caught:
        opener.next_frame()
    assert caught.value.code == RejectCode.TOO_LARGE


@pytest.mark.parametrize("length", [0, 1, TAG_SIZE])
def test_frames_without_payload_are_malformed(length: int) -> None:
    _, opener = pair()
    opener.feed(HEADER.pack(length))
    with pytest.raises(ProtocolViolation) as caught:
        opener.next_frame()
    assert caught.value.code == RejectCode.MALFORMED


def test_flipping_the_control_bit_fails_authentication() -> None:
    sealer, opener = pair()
    frame = bytearray(sealer.seal(b"x" * 10))
    frame[0] ^= 0x80
    opener.feed(frame)
    with pytest.raises(ProtocolViolation) as caught:
        opener.next_frame()
    assert caught.value.code == RejectCode.BAD_SIGNATURE


def test_truncation_is_detected_at_end_of_stream() -> None:
    sealer, opener = pair()
    frame = sealer.seal(b"y" * 1000)
    for cut in (1, 4, 5, len(frame) - 1):
        _, opener = pair()
        opener.feed(frame[:cut])
        assert opener.next_frame() is None
        with pytest.raises(PeerUnavailable):
            opener.end_of_stream()
    _, opener = pair()
    opener.feed(frame)
    assert drain(opener) == [OpenedFrame(False, b"y" * 1000)]
    opener.end_of_stream()


def test_counter_exhaustion_closes_instead_of_reusing_a_nonce() -> None:
    sealer = FrameSealer(KEYS.opener_to_acceptor, LABEL_OPENER, counter=MAX_COUNTER)
    opener = FrameOpener(KEYS.opener_to_acceptor, LABEL_OPENER, MAX_FRAME, counter=MAX_COUNTER)
    opener.feed(sealer.seal(b"last"))
    assert drain(opener) == [OpenedFrame(False, b"last")]
    with pytest.raises(ChannelClosed):
        sealer.seal(b"one too many")
    with pytest.raises(ChannelClosed):
        sealer.seal_into(bytearray(100), b"one too many")
    # A peer that went on anyway is refused from the header.
    forged = FrameSealer(KEYS.opener_to_acceptor, LABEL_OPENER, counter=0).seal(b"wrapped")
    opener.feed(forged)
    with pytest.raises(ProtocolViolation):
        opener.next_frame()


def test_seal_into_matches_seal_and_reuses_the_buffer() -> None:
    a = FrameSealer(KEYS.opener_to_acceptor, LABEL_OPENER)
    b = FrameSealer(KEYS.opener_to_acceptor, LABEL_OPENER)
    buf = bytearray(sealed_size(5000) + 100)
    for payload in (b"a" * 5000, b"b" * 10):
        size = a.seal_into(buf, memoryview(payload))
        assert bytes(buf[:size]) == b.seal(payload)
    with pytest.raises(ValueError):
        a.seal_into(bytearray(10), b"too big for the buffer")
    with pytest.raises(ValueError):
        a.seal(b"")


def test_keys_bind_secret_ticket_peers_and_direction() -> None:
    base = derive_keys(bytes(32), bytes(16), b"A", b"B")
    assert base == derive_keys(bytes(32), bytes(16), b"A", b"B")
    assert base.opener_to_acceptor != base.acceptor_to_opener
    variants = [
        derive_keys(b"\x01" + bytes(31), bytes(16), b"A", b"B"),
        derive_keys(bytes(32), b"\x01" + bytes(15), b"A", b"B"),
        derive_keys(bytes(32), bytes(16), b"B", b"A"),
        derive_keys(bytes(32), bytes(16), b"A", b"C"),
        # Length prefixes keep ("AB", "") style splits of the same bytes apart.
        derive_keys(bytes(32), bytes(16), b"AB", b"C"),
    ]
    keys = {base.opener_to_acceptor} | {v.opener_to_acceptor for v in variants}
    assert len(keys) == len(variants) + 1
    with pytest.raises(ValueError):
        derive_keys(bytes(31), bytes(16), b"A", b"B")


def test_a_frame_does_not_open_in_the_other_direction() -> None:
    frame = FrameSealer(KEYS.opener_to_acceptor, LABEL_OPENER).seal(b"hello")
    wrong = FrameOpener(KEYS.acceptor_to_opener, LABEL_ACCEPTOR, MAX_FRAME)
    wrong.feed(frame)
    with pytest.raises(ProtocolViolation):
        wrong.next_frame()


def test_large_frames_in_small_pieces_cost_linear_copying() -> None:
    size = 32 * 1024 * 1024
    sealer = FrameSealer(KEYS.opener_to_acceptor, LABEL_OPENER)
    opener = FrameOpener(KEYS.opener_to_acceptor, LABEL_OPENER, size)
    payload = os.urandom(size)
    stream = memoryview(sealer.seal(payload) + sealer.seal(payload[:1000]))
    started = time.perf_counter()
    got = []
    # 8 KiB pieces: with copying quadratic in the frame size this is ~64 GB of memmove.
    for i in range(0, len(stream), 8192):
        opener.feed(stream[i : i + 8192])
        got.extend(drain(opener))
    elapsed = time.perf_counter() - started
    assert [f.payload for f in got] == [payload, payload[:1000]]
    assert elapsed < 3.0, f"feeding took {elapsed:.2f} s"


def test_large_frames_open_into_a_given_buffer_and_reuse_their_own() -> None:
    sealer, opener = pair(max_frame=1 << 20)
    payloads = [os.urandom(300_000), os.urandom(250_000), os.urandom(300_000)]
    opener.feed(b"".join(sealer.seal(p) for p in payloads))
    out = bytearray(400_000)
    buffers = []
    for expected in payloads:
        frame = opener.next_frame()
        assert isinstance(frame, SealedFrame)
        assert frame.size == len(expected)
        with pytest.raises(ValueError):
            opener.open_into(frame, bytearray(frame.size - 1))
        assert opener.open_into(frame, out) == len(expected)
        assert out[: len(expected)] == expected
        buffers.append(frame.buffer)
        opener.recycle(frame)
    # The second frame was read into the first one's buffer, the third into the second's.
    assert buffers[1] is buffers[0]
    assert opener.next_frame() is None
    opener.end_of_stream()


def test_a_tampered_large_frame_fails_when_opened() -> None:
    sealer, opener = pair(max_frame=1 << 20)
    frame = bytearray(sealer.seal(os.urandom(200_000)))
    frame[100_000] ^= 4
    opener.feed(frame)
    sealed = opener.next_frame()
    assert isinstance(sealed, SealedFrame)
    with pytest.raises(ProtocolViolation):
        opener.open_into(sealed, bytearray(200_000))
    with pytest.raises(ProtocolViolation):
        opener.next_frame()
