"""Credit-based flow control without I/O: two engines over a fake link."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dandelion_p2p.dataplane.errors import ChannelClosed
from dandelion_p2p.dataplane.flow import ChannelCore, Closed, Credit, Data, Event
from dandelion_p2p.dataplane.sealing import LABEL_OPENER, FrameSealer, derive_keys
from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation
from dandelion_p2p.wire import RejectCode

KEYS = derive_keys(bytes(range(32)), bytes(range(16)), b"opener", b"acceptor")
MAX_FRAME = 4096


def cores(
    window_bytes: int = 2 * MAX_FRAME, window_frames: int = 8
) -> tuple[ChannelCore, ChannelCore]:
    def make(role: str) -> ChannelCore:
        return ChannelCore.for_session(
            KEYS,
            role,  # type: ignore[arg-type]
            receive_max_frame=MAX_FRAME,
            send_max_frame=MAX_FRAME,
            window_bytes=window_bytes,
            window_frames=window_frames,
        )

    return make("opener"), make("acceptor")


def deliver(frame: bytes, to: ChannelCore) -> list[Event]:
    to.feed(frame)
    events = []
    while (event := to.next_event()) is not None:
        events.append(event)
    return events


def connect(a: ChannelCore, b: ChannelCore) -> None:
    """Exchange the initial windows."""
    for src, dst in ((a, b), (b, a)):
        grant = src.take_grant()
        assert grant is not None
        assert deliver(grant, dst) == [Credit(src.window_frames, src.window_bytes)]


def test_nothing_may_be_sent_before_the_first_grant() -> None:
    a, b = cores()
    assert not a.can_send(1)
    with pytest.raises(RuntimeError):
        a.seal_data(b"x")
    connect(a, b)
    assert a.can_send(MAX_FRAME)
    assert deliver(a.seal_data(b"hello"), b) == [Data(b"hello")]


def test_credit_is_spent_and_returned_in_batches() -> None:
    a, b = cores(window_bytes=4 * MAX_FRAME, window_frames=100)
    connect(a, b)
    sent = 0
    while a.can_send(MAX_FRAME):
        deliver(a.seal_data(bytes(MAX_FRAME)), b)
        sent += 1
    assert sent == 4
    # A quarter of the window consumed makes a grant due, not before.
    assert b.take_grant() is None
    assert b.consumed(MAX_FRAME) is True
    grant = b.take_grant()
    assert grant is not None
    assert deliver(grant, a) == [Credit(1, MAX_FRAME)]
    assert a.can_send(MAX_FRAME)
    assert b.take_grant() is None


def test_a_frame_beyond_granted_credit_is_a_violation() -> None:
    a, b = cores()
    connect(a, b)
    # The peer's sealer, used directly, ignores the credit books.
    rogue = a.sealer
    deliver(a.seal_data(bytes(MAX_FRAME)), b)
    deliver(a.seal_data(bytes(MAX_FRAME)), b)
    with pytest.raises(ProtocolViolation) as caught:
        deliver(rogue.seal(b"one more"), b)
    assert caught.value.code == RejectCode.UNEXPECTED


def test_frame_count_credit_is_enforced_too() -> None:
    a, b = cores(window_frames=2)
    connect(a, b)
    deliver(a.seal_data(b"1"), b)
    deliver(a.seal_data(b"2"), b)
    assert not a.can_send(1)
    with pytest.raises(ProtocolViolation):
        deliver(a.sealer.seal(b"3"), b)


def test_close_then_nothing_more() -> None:
    a, b = cores()
    connect(a, b)
    assert deliver(a.seal_data(b"last"), b) == [Data(b"last")]
    assert deliver(a.seal_close(), b) == [Closed()]
    b.end_of_stream()  # an orderly end
    with pytest.raises(ChannelClosed):
        a.seal_data(b"after close")
    with pytest.raises(ChannelClosed):
        b.check_can_send()
    assert a.take_grant() is None
    with pytest.raises(ProtocolViolation):
        deliver(a.sealer.seal(b"after close"), b)


def test_end_without_close_is_a_cut_off_peer() -> None:
    a, b = cores()
    connect(a, b)
    deliver(a.seal_data(b"data"), b)
    with pytest.raises(PeerUnavailable) as caught:
        b.end_of_stream()
    assert not isinstance(caught.value, ChannelClosed)


def test_end_inside_a_frame_is_a_cut_off_peer() -> None:
    a, b = cores()
    connect(a, b)
    frame = a.seal_data(bytes(1000))
    b.feed(frame[:500])
    assert b.next_event() is None
    with pytest.raises(PeerUnavailable):
        b.end_of_stream()


@pytest.mark.parametrize("payload", [b"\x09", b"\x01\x00", b"\x02\x00"])
def test_unknown_or_malformed_control_frames_are_violations(payload: bytes) -> None:
    a, b = cores()
    connect(a, b)
    with pytest.raises(ProtocolViolation):
        deliver(a.sealer.seal(payload, control=True), b)


def test_absurd_credit_is_a_violation() -> None:
    _, b = cores()
    forged = FrameSealer(KEYS.opener_to_acceptor, LABEL_OPENER)
    grant = b"\x01" + (2**32 - 1).to_bytes(4, "big") + (2**63).to_bytes(8, "big")
    with pytest.raises(ProtocolViolation):
        deliver(forged.seal(grant, control=True), b)


def test_windows_smaller_than_two_frames_are_refused() -> None:
    with pytest.raises(ValueError):
        cores(window_bytes=MAX_FRAME)


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=MAX_FRAME), min_size=1, max_size=60),
    window_factor=st.integers(min_value=2, max_value=5),
    window_frames=st.integers(min_value=2, max_value=10),
    consume_batch=st.integers(min_value=1, max_value=6),
)
def test_credit_never_deadlocks_and_never_overflows_the_window(
    sizes: list[int], window_factor: int, window_frames: int, consume_batch: int
) -> None:
    """Whatever the frame sizes, a consumer that takes what arrives lets every frame through,
    and the receiver never holds more than its window."""
    a, b = cores(window_bytes=window_factor * MAX_FRAME, window_frames=window_frames)
    connect(a, b)
    queue: list[bytes] = []
    received: list[bytes] = []
    pending = list(sizes)
    for _ in range(10_000):
        progressed = False
        while pending and a.can_send(pending[0]):
            for event in deliver(a.seal_data(bytes([len(received) % 251]) * pending.pop(0)), b):
                assert isinstance(event, Data)
                queue.append(event.payload)
            progressed = True
            assert sum(map(len, queue)) <= b.window_bytes
            assert len(queue) <= b.window_frames
        # The consumer takes up to a batch, as an application would.
        for _ in range(min(consume_batch, len(queue))):
            frame = queue.pop(0)
            received.append(frame)
            b.consumed(len(frame))
            progressed = True
        # As the channel does: grants go out only when due, never to unstick a sender.
        if b.grant_due():
            grant = b.take_grant()
            if grant is not None:
                deliver(grant, a)
                progressed = True
        if not pending and not queue:
            break
        assert progressed, "stalled"
    assert [len(f) for f in received] == sizes


def test_a_peeked_event_is_kept_for_next_event() -> None:
    a, b = cores()
    grant = b.take_grant()
    assert grant is not None
    assert not a.peek_event()
    a.feed(grant + b"\x00")  # and the first byte of whatever follows
    assert a.peek_event()
    assert a.peek_event()  # idempotent
    assert a.can_send(1)  # the credit already counts
    assert a.next_event() == Credit(b.window_frames, b.window_bytes)
    assert a.next_event() is None
