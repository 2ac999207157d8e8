"""One conformance suite for both transports of the data plane.

Frames travel over a plain TCP connection (``TcpTransport``, kind ``"direct"``) or over the
libp2p stream itself (``StreamTransport``, kind ``"relayed"``). Both implement
``channel.Transport``, a byte pipe, and ``Channel`` builds sealed, credit-controlled frames on
it. Every test runs on both, over real sockets: a loopback TCP connection tuned as the data plane
tunes it, and a yamux stream between two real libp2p hosts. In the spirit of
``trio.testing.check_two_way_stream``, whatever one transport promises the other must keep too:
first as byte pipes, then as the channels the rest of the daemon uses.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import pytest
import trio
import trio.testing
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from dandelion_p2p.dataplane.channel import (
    Channel,
    ChannelKind,
    StreamTransport,
    TcpTransport,
    Transport,
)
from dandelion_p2p.dataplane.errors import ChannelClosed
from dandelion_p2p.dataplane.flow import ChannelCore, Credit, Data
from dandelion_p2p.dataplane.messages import Mode
from dandelion_p2p.dataplane.session import tune_socket
from dandelion_p2p.errors import PeerUnavailable
from tests.dataplane.conftest import A, B, channel_core, session_keys
from tests.swarm import swarm

KINDS: tuple[ChannelKind, ...] = ("direct", "relayed")
MODES: dict[ChannelKind, Mode] = {"direct": "dial-acceptor", "relayed": "stream"}
LOOPBACK = "127.0.0.1"
PROTOCOL = TProtocol("/dandelion/test/conformance/1.0.0")
KiB = 1024
MiB = 1024 * KiB
# Larger than a yamux window (256 KiB), a Noise message (64 KiB) and a socket's buffers, so
# frames of this size are always split on the way and put back together.
MAX_FRAME = 2 * MiB
SMALL_FRAME = 64 * KiB
# Generous: a test that hangs fails by this bound, never by a channel's own timeout.
TIMEOUT = 30.0
# Long enough that a transport released by the linger rather than by the peer's end of stream
# shows up as a test running into its ``fail_after``.
LINGER = 60.0
PROMPTLY = 10.0


# ---- the pairs under test ---------------------------------------------------------------------


@asynccontextmanager
async def tcp_transports() -> AsyncIterator[tuple[Transport, Transport]]:
    """Both ends of a loopback TCP connection, tuned like the data plane's own."""
    listener = (await trio.open_tcp_listeners(0, host=LOOPBACK))[0]
    async with listener:
        ours = await trio.open_tcp_stream(LOOPBACK, listener.socket.getsockname()[1])
        theirs = await listener.accept()
    ends = [TcpTransport(ours), TcpTransport(theirs)]
    try:
        for end in ends:
            tune_socket(end.stream)
        yield ends[0], ends[1]
    finally:
        for end in ends:
            await end.aclose()


@asynccontextmanager
async def libp2p_transports() -> AsyncIterator[tuple[Transport, Transport]]:
    """Both ends of a yamux stream between two real libp2p hosts on loopback."""
    async with swarm(2) as (a, b):
        arrived_in, arrived = trio.open_memory_channel[INetStream](1)
        b.host.set_stream_handler(PROTOCOL, arrived_in.send)
        with trio.fail_after(PROMPTLY):
            stream = await a.host.new_stream(b.peer_id, [PROTOCOL])
            ends = [StreamTransport(stream), StreamTransport(await arrived.receive())]
        try:
            yield ends[0], ends[1]
        finally:
            for end in ends:
                await end.aclose()


@pytest.fixture(params=KINDS)
async def transports(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Transport, Transport]]:
    """A connected pair (ours, theirs) of each kind of transport."""
    build = tcp_transports if request.param == "direct" else libp2p_transports
    async with build() as (ours, theirs):
        assert ours.kind == theirs.kind == request.param
        yield ours, theirs


@asynccontextmanager
async def channel_pair(
    transports: tuple[Transport, Transport],
    *,
    max_frame: int = MAX_FRAME,
    window: int | None = None,
    timeout: float = TIMEOUT,
) -> AsyncIterator[tuple[Channel, Channel]]:
    """Started channels on ``transports``: ours opened the session, theirs accepted it."""
    ours_transport, theirs_transport = transports
    keys = session_keys()
    mode = MODES[ours_transport.kind]
    ours = Channel(ours_transport, channel_core(keys, "opener", max_frame, window), peer_id=B,
                   purpose="conformance", mode=mode, timeout=timeout, linger=LINGER)
    theirs = Channel(theirs_transport, channel_core(keys, "acceptor", max_frame, window),
                     peer_id=A, purpose="conformance", mode=mode, timeout=timeout, linger=LINGER)
    async with trio.open_nursery() as nursery:
        ours.start(nursery)
        theirs.start(nursery)
        yield ours, theirs
        nursery.cancel_scope.cancel()


@pytest.fixture
async def channels(
    transports: tuple[Transport, Transport],
) -> AsyncIterator[tuple[Channel, Channel]]:
    """A connected pair (ours, theirs) of channels on each kind of transport."""
    async with channel_pair(transports) as pair:
        yield pair


# ---- byte-pipe helpers --------------------------------------------------------------------------


class Sink:
    """Stands in for the ``ChannelCore`` that ``Transport.receive_into`` fills: keeps every byte,
    so the transport is checked as the byte pipe it is, apart from any framing."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._buffer = bytearray(64 * KiB)

    def receive_buffer(self) -> memoryview:
        return memoryview(self._buffer)

    def commit(self, n: int) -> None:
        self.data += self._buffer[:n]

    def feed(self, data: bytes) -> None:
        self.data += data


async def receive_some(transport: Transport, sink: Sink) -> int:
    return await transport.receive_into(cast(ChannelCore, sink))


async def receive_exactly(transport: Transport, n: int) -> bytes:
    sink = Sink()
    while len(sink.data) < n:
        if await receive_some(transport, sink) == 0:
            raise AssertionError(f"end of stream after {len(sink.data)} of {n} bytes")
    assert len(sink.data) == n, "more bytes than were sent"
    return bytes(sink.data)


async def receive_to_end(transport: Transport) -> bytes:
    sink = Sink()
    while await receive_some(transport, sink):
        pass
    return bytes(sink.data)


def chunks(data: bytes, rnd: random.Random, largest: int) -> list[bytes | bytearray | memoryview]:
    """``data`` in pieces of random sizes, as each kind of buffer ``send_all`` takes."""
    out: list[bytes | bytearray | memoryview] = []
    at = 0
    while at < len(data):
        n = rnd.randint(1, largest)
        kind = rnd.choice([bytes, bytearray, memoryview])
        out.append(kind(data[at : at + n]))
        at += n
    return out


class SealedEnd:
    """A transport driven by hand with a real ``ChannelCore``, no ``Channel`` in between."""

    def __init__(self, transport: Transport, core: ChannelCore) -> None:
        self.transport = transport
        self.core = core

    async def send(self, payload: bytes) -> None:
        await self.transport.send_all(self.core.seal_data(payload))

    async def receive(self) -> bytes:
        while (event := self.core.next_event()) is None:
            if await self.transport.receive_into(self.core) == 0:
                raise AssertionError("end of stream inside a frame")
        assert isinstance(event, Data)
        return self.core.open(event.payload)


def sealed_ends(transports: tuple[Transport, Transport]) -> tuple[SealedEnd, SealedEnd]:
    keys = session_keys()
    ours = SealedEnd(transports[0], channel_core(keys, "opener", MAX_FRAME, None))
    theirs = SealedEnd(transports[1], channel_core(keys, "acceptor", MAX_FRAME, None))
    # Each grants its whole window to the other in memory: the transports carry data only.
    for sender, receiver in ((ours, theirs), (theirs, ours)):
        grant = receiver.core.take_grant()
        assert grant is not None
        sender.core.feed(grant)
        assert isinstance(sender.core.next_event(), Credit)
    return ours, theirs


# ---- the transport as a byte pipe ---------------------------------------------------------------


async def test_bytes_arrive_in_order_and_intact_both_ways_at_once(
    transports: tuple[Transport, Transport],
) -> None:
    rnd = random.Random(1)
    ours, theirs = transports
    outgoing = {id(ours): os.urandom(3 * MiB), id(theirs): os.urandom(3 * MiB)}
    got: dict[int, bytes] = {}

    async def pump(src: Transport, dst: Transport) -> None:
        async def send() -> None:
            for chunk in chunks(outgoing[id(src)], rnd, 300 * KiB):
                await src.send_all(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            got[id(src)] = await receive_exactly(dst, len(outgoing[id(src)]))

    with trio.fail_after(PROMPTLY):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, ours, theirs)
            nursery.start_soon(pump, theirs, ours)
    assert got == outgoing


async def test_a_large_write_is_split_and_reassembled(
    transports: tuple[Transport, Transport],
) -> None:
    ours, theirs = transports
    data = os.urandom(8 * MiB)
    sink = Sink()
    reads = 0
    with trio.fail_after(PROMPTLY):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours.send_all, memoryview(data))
            while len(sink.data) < len(data):
                assert await receive_some(theirs, sink) > 0
                reads += 1
    assert sink.data == data
    assert reads > 1


async def test_sealed_frames_of_every_size_cross_intact(
    transports: tuple[Transport, Transport],
) -> None:
    """With a real core on each end, including the zero-copy path of large frames."""
    sizes = [1, 2, 100, 4 * KiB, 64 * KiB - 17, 64 * KiB, 256 * KiB + 1, 700_001, MAX_FRAME]
    frames = [os.urandom(n) for n in sizes]
    ours, theirs = sealed_ends(transports)
    got: dict[str, list[bytes]] = {"ours": [], "theirs": []}

    async def pump(src: SealedEnd, dst: SealedEnd, key: str) -> None:
        async def send() -> None:
            for frame in frames:
                await src.send(frame)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            for _ in frames:
                got[key].append(await dst.receive())

    with trio.fail_after(PROMPTLY):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, ours, theirs, "theirs")
            nursery.start_soon(pump, theirs, ours, "ours")
    assert got == {"ours": frames, "theirs": frames}


async def test_an_empty_write_carries_nothing(transports: tuple[Transport, Transport]) -> None:
    ours, theirs = transports
    with trio.fail_after(PROMPTLY):
        await ours.send_all(b"")
        await ours.send_all(b"x")
        await ours.send_all(bytearray())
        await ours.send_all(b"yz")
        assert await receive_exactly(theirs, 3) == b"xyz"
        await ours.send_eof()
        assert await receive_to_end(theirs) == b""


async def test_send_eof_ends_one_direction_after_its_data(
    transports: tuple[Transport, Transport],
) -> None:
    """What a closing channel relies on: CLOSE and the end of stream reach the peer after all
    data, and it still reads the peer's last frames until the peer's own end of stream."""
    ours, theirs = transports
    there, back = os.urandom(MiB), os.urandom(MiB)
    with trio.fail_after(PROMPTLY):
        await ours.send_all(there)
        await ours.send_eof()
        await ours.send_eof()  # again: nothing happens
        with pytest.raises(PeerUnavailable):
            await ours.send_all(b"after the end")
        assert await receive_to_end(theirs) == there
        assert await receive_some(theirs, Sink()) == 0  # and stays at its end
        await theirs.send_all(back)
        await theirs.send_eof()
        assert await receive_to_end(ours) == back


async def test_aclose_is_idempotent_and_never_raises(
    transports: tuple[Transport, Transport],
) -> None:
    ours, theirs = transports
    with trio.fail_after(PROMPTLY):
        await ours.send_all(b"bye")
        await ours.aclose()
        await ours.aclose()
        assert await receive_to_end(theirs) == b"bye"
        await theirs.aclose()  # after the peer's
        await theirs.aclose()
        await ours.aclose()


async def test_data_written_before_aclose_arrives_then_the_stream_ends(
    transports: tuple[Transport, Transport],
) -> None:
    """A peer that goes away (``Channel.abort``) ends the stream: after the bytes it sent, the
    other side sees an end of stream or ``PeerUnavailable``, never invented data, never a hang."""
    ours, theirs = transports
    data = os.urandom(MiB)
    sink = Sink()
    with trio.fail_after(PROMPTLY):
        await ours.send_all(data)
        await ours.aclose()
        try:
            while await receive_some(theirs, sink):
                pass
        except PeerUnavailable:
            pass
    assert sink.data == data


async def test_writes_to_a_closed_peer_fail_in_the_end(
    transports: tuple[Transport, Transport],
) -> None:
    """At once over TCP (a reset); over yamux only when the peer's window stays shut for 5 s."""
    ours, theirs = transports
    await theirs.aclose()
    with trio.fail_after(15), pytest.raises(PeerUnavailable):
        while True:
            await ours.send_all(bytes(MiB))


async def test_a_closed_transport_refuses_to_send_and_receive(
    transports: tuple[Transport, Transport],
) -> None:
    ours, _ = transports
    await ours.aclose()
    with trio.fail_after(PROMPTLY):
        with pytest.raises(PeerUnavailable):
            await ours.send_all(b"x")
        with pytest.raises(PeerUnavailable):
            await receive_some(ours, Sink())


async def test_aclose_wakes_a_blocked_receive(transports: tuple[Transport, Transport]) -> None:
    ours, _ = transports
    outcome: list[BaseException | int] = []

    async def receive() -> None:
        try:
            outcome.append(await receive_some(ours, Sink()))
        except PeerUnavailable as exc:
            outcome.append(exc)

    with trio.fail_after(PROMPTLY):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await ours.aclose()
    assert len(outcome) == 1
    assert isinstance(outcome[0], PeerUnavailable)


async def test_a_receive_cancelled_while_waiting_loses_nothing(
    transports: tuple[Transport, Transport],
) -> None:
    ours, theirs = transports
    data = os.urandom(MiB)
    sink = Sink()
    with trio.fail_after(PROMPTLY):
        for part in chunks(data, random.Random(2), 128 * KiB):
            with trio.move_on_after(0.005) as waiting:  # nothing is on its way yet
                await receive_some(theirs, sink)
            assert waiting.cancelled_caught
            expected = len(sink.data) + len(part)
            await ours.send_all(part)
            while len(sink.data) < expected:
                assert await receive_some(theirs, sink) > 0
    assert sink.data == data


# A Channel never cancels its reader before it ends, so this does not reach the daemon.
_YAMUX_CANCELLED_READ = pytest.mark.xfail(
    reason="py-libp2p 0.8.1 yamux: YamuxStream.read takes the bytes from its buffer, then awaits "
    "the window update; cancelled there, it drops the bytes and their window credit",
    strict=False,
    # On a loaded machine it once took 138 s (under 1 s here, its 30 s deadline did not end
    # it): while the locked py-libp2p has the bug, it is not run.
    run=False,
)


@pytest.mark.parametrize(
    "transports",
    ["direct", pytest.param("relayed", marks=_YAMUX_CANCELLED_READ)],
    indirect=True,
)
async def test_a_receive_cancelled_mid_transfer_loses_nothing(
    transports: tuple[Transport, Transport],
) -> None:
    ours, theirs = transports
    rnd = random.Random(3)
    data = os.urandom(4 * MiB)
    sink = Sink()
    cancelled = 0

    async def send() -> None:
        for part in chunks(data, rnd, 64 * KiB):
            await ours.send_all(part)
            await trio.sleep(rnd.uniform(0, 0.001))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while (before := len(sink.data)) < len(data):
                with trio.move_on_after(rnd.uniform(0, 0.001)) as scope:
                    await receive_some(theirs, sink)
                cancelled += scope.cancelled_caught
                assert sink.data[before:] == data[before : len(sink.data)], "bytes lost or damaged"
    assert sink.data == data
    assert cancelled > 0


# ---- channels on the transport ------------------------------------------------------------------


async def test_channels_name_their_transport(
    transports: tuple[Transport, Transport], channels: tuple[Channel, Channel]
) -> None:
    ours, theirs = channels
    assert ours.kind == theirs.kind == transports[0].kind
    assert ours.mode == theirs.mode == MODES[transports[0].kind]
    assert ours.max_frame == theirs.max_frame == ours.receive_max_frame == MAX_FRAME


async def test_frames_keep_order_and_boundaries_both_ways_at_once(
    transports: tuple[Transport, Transport],
) -> None:
    """Many more frames than the window holds: credit goes round again and again, grants and
    data share each direction, and every frame arrives whole and in order."""
    rnd = random.Random(4)
    sizes = [1, SMALL_FRAME, *(rnd.randint(1, SMALL_FRAME) for _ in range(150)), SMALL_FRAME, 1]
    outgoing = {"ours": [os.urandom(n) for n in sizes], "theirs": [os.urandom(n) for n in sizes]}
    got: dict[str, list[bytes]] = {}
    async with channel_pair(
        transports, max_frame=SMALL_FRAME, window=2 * SMALL_FRAME
    ) as (ours, theirs):

        async def pump(src: Channel, dst: Channel, key: str) -> None:
            async def send() -> None:
                for frame in outgoing[key]:
                    await src.send(frame)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                got[key] = [await dst.receive() for _ in outgoing[key]]

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, ours, theirs, "ours")
                nursery.start_soon(pump, theirs, ours, "theirs")
        assert got == outgoing
        for src, dst in ((ours, theirs), (theirs, ours)):
            assert src.frames_sent == dst.frames_received == len(sizes)
            assert src.bytes_sent == dst.bytes_received == sum(sizes)


async def test_largest_frames_are_split_and_reassembled(
    channels: tuple[Channel, Channel],
) -> None:
    ours, theirs = channels
    frames = [os.urandom(MAX_FRAME) for _ in range(4)]
    out = bytearray(MAX_FRAME)
    with trio.fail_after(TIMEOUT):
        await ours.send(frames[0])
        await ours.send([frames[1][:1000], memoryview(frames[1])[1000:]])  # joined from parts
        await ours.send(bytearray(frames[2]))
        await ours.send(memoryview(frames[3]))
        assert await theirs.receive() == frames[0]
        assert await theirs.receive() == frames[1]
        for frame in frames[2:]:
            assert await theirs.receive_into(out) == MAX_FRAME
            assert out == frame
        await theirs.send(frames[0])
        assert await ours.receive() == frames[0]


async def test_frame_size_limits_are_as_documented(channels: tuple[Channel, Channel]) -> None:
    """Frames of 1 to ``max_frame`` bytes go; an empty or larger one is refused locally and
    harms nothing; a buffer too small for the next frame leaves it queued."""
    ours, theirs = channels
    with trio.fail_after(PROMPTLY):
        for refused in (b"", bytes(MAX_FRAME + 1), [], [b"", b""], [bytes(MAX_FRAME), b"x"]):
            with pytest.raises(ValueError):
                await ours.send(refused)
        assert ours.is_open
        assert ours.frames_sent == 0
        await ours.send(b"\x01")
        await ours.send(b"\x02" * MAX_FRAME)
        with pytest.raises(ValueError):
            await theirs.receive_into(bytearray(0))
        assert await theirs.receive() == b"\x01"
        with pytest.raises(ValueError):
            await theirs.receive_into(bytearray(MAX_FRAME - 1))
        assert await theirs.receive() == b"\x02" * MAX_FRAME
        assert theirs.frames_received == 2


async def test_an_orderly_close_delivers_everything_then_reports_closed(
    channels: tuple[Channel, Channel],
) -> None:
    ours, theirs = channels
    frames = [os.urandom(n) for n in (1, 1000, MAX_FRAME, 3)]
    with trio.fail_after(PROMPTLY):
        for frame in frames:
            await ours.send(frame)
        await ours.aclose()
        assert not ours.is_open
        for frame in frames:
            assert await theirs.receive() == frame
        for _ in range(2):  # and it stays closed
            with pytest.raises(ChannelClosed):
                await theirs.receive()
        with pytest.raises(ChannelClosed):
            await theirs.send(b"too late")
        with pytest.raises(ChannelClosed):
            await ours.send(b"too late")
        with pytest.raises(ChannelClosed):
            await ours.receive()
        # Both transports are released by the ends of stream, long before the linger.
        await ours.finished.wait()
        await theirs.finished.wait()
        await theirs.aclose()


async def test_aclose_is_idempotent_and_never_raises_on_either_side(
    channels: tuple[Channel, Channel],
) -> None:
    ours, theirs = channels
    with trio.fail_after(PROMPTLY):
        await ours.send(b"crossing")
        await theirs.send(b"crossing")
        async with trio.open_nursery() as nursery:  # both close at once
            for channel in (ours, theirs, ours, theirs):
                nursery.start_soon(channel.aclose)
        await ours.aclose()
        await theirs.aclose()
        await ours.finished.wait()
        await theirs.finished.wait()
        await ours.aclose()  # after the transport is gone too
        for channel in (ours, theirs):
            with pytest.raises(ChannelClosed):
                await channel.send(b"x")
            with pytest.raises(ChannelClosed):
                await channel.receive()


@pytest.mark.parametrize("closer", ["sender", "receiver"])
async def test_a_close_wakes_a_sender_waiting_for_credit(
    transports: tuple[Transport, Transport], closer: str
) -> None:
    async with channel_pair(
        transports, max_frame=SMALL_FRAME, window=2 * SMALL_FRAME
    ) as (ours, theirs):
        with trio.fail_after(PROMPTLY):
            await ours.send(bytes(SMALL_FRAME))
            await ours.send(bytes(SMALL_FRAME))
            outcome: list[BaseException] = []

            async def blocked_send() -> None:
                try:
                    await ours.send(b"waits for credit that never comes")
                except ChannelClosed as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked_send)
                await trio.testing.wait_all_tasks_blocked()
                assert not outcome
                await (ours if closer == "sender" else theirs).aclose()
        assert len(outcome) == 1
        assert ours.frames_sent == 2


async def test_a_cancelled_receive_loses_no_frame(channels: tuple[Channel, Channel]) -> None:
    ours, theirs = channels
    rnd = random.Random(5)
    frames = [os.urandom(rnd.randint(1, 100 * KiB)) for _ in range(200)]
    got: list[bytes] = []
    cancelled = 0

    async def send() -> None:
        for frame in frames:
            await ours.send(frame)
            await trio.sleep(rnd.uniform(0, 0.001))

    with trio.fail_after(TIMEOUT):
        with trio.move_on_after(0.005) as waiting:  # nothing on its way yet
            await theirs.receive()
        assert waiting.cancelled_caught
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while len(got) < len(frames):
                with trio.move_on_after(rnd.uniform(0, 0.001)) as scope:
                    got.append(await theirs.receive())
                cancelled += scope.cancelled_caught
    assert got == frames
    assert cancelled > 0
    assert theirs.is_open


async def test_a_cancelled_send_sends_the_whole_frame_or_nothing(
    transports: tuple[Transport, Transport],
) -> None:
    """Exactly the frames whose ``send`` returned arrive, whole and in order."""
    rnd = random.Random(6)
    async with channel_pair(
        transports, max_frame=SMALL_FRAME, window=2 * SMALL_FRAME
    ) as (ours, theirs):
        sent: list[bytes] = []
        got: list[bytes] = []
        with trio.fail_after(TIMEOUT):
            # Cancelled before it starts, and while it waits for credit: nothing goes out.
            with trio.CancelScope() as scope:
                scope.cancel()
                await ours.send(b"cancelled before it started")
            await ours.send(b"a" * SMALL_FRAME)
            await ours.send(b"b" * SMALL_FRAME)
            sent += [b"a" * SMALL_FRAME, b"b" * SMALL_FRAME]
            with trio.move_on_after(0.05) as waiting:
                await ours.send(b"cancelled while it waited")
            assert waiting.cancelled_caught
            assert ours.is_open

            async def consume() -> None:
                while (frame := await theirs.receive()) != b"end":
                    got.append(frame)
                    await trio.sleep(rnd.uniform(0, 0.001))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                for i in range(200):
                    frame = i.to_bytes(2, "big") * rnd.randint(1, SMALL_FRAME // 2)
                    with trio.move_on_after(rnd.uniform(0, 0.002)):
                        await ours.send(frame)
                        sent.append(frame)
                await ours.send(b"end")
        assert got == sent
        assert ours.frames_sent == theirs.frames_received == len(sent) + 1


async def test_a_receive_timeout_leaves_the_channel_usable(
    channels: tuple[Channel, Channel],
) -> None:
    ours, theirs = channels
    with trio.fail_after(PROMPTLY):
        with pytest.raises(PeerUnavailable) as caught:
            await theirs.receive(timeout=0.05)
        assert not isinstance(caught.value, ChannelClosed)
        assert theirs.is_open
        await ours.send(b"after a timeout")
        assert await theirs.receive(timeout=PROMPTLY) == b"after a timeout"


async def test_an_abort_is_a_cut_off_not_a_close(channels: tuple[Channel, Channel]) -> None:
    ours, theirs = channels
    with trio.fail_after(PROMPTLY):
        await ours.send(b"before")
        ours.abort()
        assert await theirs.receive() == b"before"
        with pytest.raises(PeerUnavailable) as caught:
            await theirs.receive()
        assert not isinstance(caught.value, ChannelClosed)
        with pytest.raises(PeerUnavailable):
            await theirs.send(b"to nobody")
        await theirs.aclose()
        await ours.aclose()
        await ours.finished.wait()
        await theirs.finished.wait()


async def test_closing_with_frames_unread_still_delivers_what_was_sent(
    transports: tuple[Transport, Transport],
) -> None:
    """We close while the peer's frames still come in (and we never read them): the frames we
    sent must all arrive, not be destroyed by a reset on the unread bytes."""
    async with channel_pair(
        transports, max_frame=SMALL_FRAME, window=4 * SMALL_FRAME
    ) as (ours, theirs):
        ours_frames = [os.urandom(SMALL_FRAME) for _ in range(3)]
        with trio.fail_after(TIMEOUT):
            async def flood() -> None:
                try:
                    while True:
                        await theirs.send(os.urandom(SMALL_FRAME))
                except ChannelClosed:
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                while ours.frames_received < 4:  # the whole window arrived, unread
                    await trio.sleep(0.001)
                for frame in ours_frames:
                    await ours.send(frame)
                await ours.aclose()
                got = [await theirs.receive() for _ in ours_frames]
                with pytest.raises(ChannelClosed):
                    await theirs.receive()
            await ours.finished.wait()
            await theirs.finished.wait()
        assert got == ours_frames


async def test_concurrent_senders_never_interleave_frames(
    channels: tuple[Channel, Channel],
) -> None:
    ours, theirs = channels
    rnd = random.Random(7)
    per_task = 12

    async def sender(task: int) -> None:
        for seq in range(per_task):
            size = rnd.choice([1, 1000, 300 * KiB, MAX_FRAME - 2]) // 2
            await ours.send(bytes([task, seq]) * max(size, 1))

    got: list[bytes] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for task in range(4):
                nursery.start_soon(sender, task)
            for _ in range(4 * per_task):
                got.append(await theirs.receive())
    seen: dict[int, list[int]] = {}
    for frame in got:
        task, seq = frame[0], frame[1]
        assert frame == bytes([task, seq]) * (len(frame) // 2), "a frame was torn or mixed"
        seen.setdefault(task, []).append(seq)
    assert seen == {task: list(range(per_task)) for task in range(4)}
