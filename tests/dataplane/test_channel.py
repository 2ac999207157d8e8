"""``Channel`` over a local socket pair: boundaries, credit, close, cut-offs, tampering."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from dandelion_p2p.dataplane.channel import Channel, TcpTransport
from dandelion_p2p.dataplane.errors import ChannelClosed
from dandelion_p2p.dataplane.flow import ChannelCore, Credit
from dandelion_p2p.dataplane.sealing import MAX_COUNTER
from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation
from tests.dataplane.conftest import A, B
from tests.dataplane.conftest import channel_core as core
from tests.dataplane.conftest import session_keys as session

SMALL = 4096


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


@asynccontextmanager
async def channel_pair(
    max_frame: int = 1 << 20, window: int | None = None, timeout: float = 5.0
) -> AsyncIterator[tuple[Channel, Channel]]:
    keys = session()
    left, right = socket_pair()
    a = Channel(TcpTransport(left), core(keys, "opener", max_frame, window),
                peer_id=B, purpose="test", mode="dial-acceptor", timeout=timeout, linger=1.0)
    b = Channel(TcpTransport(right), core(keys, "acceptor", max_frame, window),
                peer_id=A, purpose="test", mode="dial-acceptor", timeout=timeout, linger=1.0)
    async with trio.open_nursery() as nursery:
        a.start(nursery)
        b.start(nursery)
        yield a, b
        nursery.cancel_scope.cancel()


class RawPeer:
    """The opener's end driven by hand, to put exactly chosen bytes on the wire."""

    def __init__(self, stream: trio.SocketStream, core: ChannelCore) -> None:
        self.stream = stream
        self.core = core

    async def handshake(self) -> None:
        grant = self.core.take_grant()
        assert grant is not None
        await self.stream.send_all(grant)
        while not self.core.can_send(1):
            self.core.feed(await self.stream.receive_some(65536))
            while (event := self.core.next_event()) is not None:
                assert isinstance(event, Credit)


@asynccontextmanager
async def raw_and_channel(
    max_frame: int = 1 << 20,
) -> AsyncIterator[tuple[RawPeer, Channel]]:
    keys = session()
    left, right = socket_pair()
    raw = RawPeer(left, core(keys, "opener", max_frame, None))
    b = Channel(TcpTransport(right), core(keys, "acceptor", max_frame, None),
                peer_id=A, purpose="test", mode="dial-acceptor", timeout=5.0, linger=1.0)
    async with left, trio.open_nursery() as nursery:
        b.start(nursery)
        await raw.handshake()
        yield raw, b
        nursery.cancel_scope.cancel()


async def test_frames_keep_boundaries_and_order_both_ways() -> None:
    sizes = [1, 2, 1000, SMALL, 65_536, 1 << 20, 3, 777_777]
    frames = [os.urandom(n) for n in sizes]
    async with channel_pair() as (a, b):
        got: dict[str, list[bytes]] = {"a": [], "b": []}

        async def pump(src: Channel, dst: Channel, key: str) -> None:
            async with trio.open_nursery() as nursery:
                async def send_all() -> None:
                    for f in frames:
                        await src.send(f)
                nursery.start_soon(send_all)
                for _ in frames:
                    got[key].append(await dst.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, a, b, "b")
            nursery.start_soon(pump, b, a, "a")
        assert got["a"] == frames
        assert got["b"] == frames
        assert a.bytes_sent == b.bytes_received == sum(sizes)
        assert a.frames_received == len(frames)
        assert a.kind == "direct"


async def test_orderly_close_delivers_everything_then_reports_closed() -> None:
    async with channel_pair() as (a, b):
        for i in range(3):
            await a.send(bytes([i]) * 100)
        await a.aclose()
        await a.aclose()  # idempotent
        for i in range(3):
            assert await b.receive() == bytes([i]) * 100
        with pytest.raises(ChannelClosed):
            await b.receive()
        with pytest.raises(ChannelClosed):
            await b.send(b"too late")
        with pytest.raises(ChannelClosed):
            await a.send(b"too late")
        with trio.fail_after(3):
            await a.finished.wait()
            await b.finished.wait()


async def test_cut_off_inside_a_frame_is_not_a_short_read() -> None:
    async with raw_and_channel() as (raw, b):
        frame = raw.core.seal_data(os.urandom(100_000))
        await raw.stream.send_all(frame[: len(frame) // 2])
        await raw.stream.aclose()
        with pytest.raises(PeerUnavailable) as caught:
            await b.receive()
        assert not isinstance(caught.value, ChannelClosed)
        assert b.frames_received == 0


async def test_end_on_a_frame_boundary_without_close_is_a_cut_off() -> None:
    async with raw_and_channel() as (raw, b):
        await raw.stream.send_all(raw.core.seal_data(b"whole"))
        await raw.stream.aclose()
        assert await b.receive() == b"whole"
        with pytest.raises(PeerUnavailable) as caught:
            await b.receive()
        assert not isinstance(caught.value, ChannelClosed)


async def test_a_tampered_frame_breaks_the_channel_after_the_good_ones() -> None:
    async with raw_and_channel() as (raw, b):
        await raw.stream.send_all(raw.core.seal_data(b"good"))
        bad = bytearray(raw.core.seal_data(b"evil" * 100))
        bad[50] ^= 0x01
        await raw.stream.send_all(bad)
        assert await b.receive() == b"good"
        with pytest.raises(ProtocolViolation):
            await b.receive()
        with pytest.raises(ProtocolViolation):
            await b.send(b"anything")
        # The socket was dropped: the raw side reads to the end of the stream.
        with trio.fail_after(3):
            while await raw.stream.receive_some(65536):
                pass


async def test_sender_waits_for_credit_and_timeouts_leave_the_channel_usable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Virtual time: the socket pair's bytes are ready as soon as they are written, so the clock
    # jumps only when every task waits for a timeout.
    async with channel_pair(max_frame=SMALL, window=2 * SMALL) as (a, b):
        await a.send(bytes(SMALL))
        await a.send(bytes(SMALL))
        # The window is full: a third frame waits for the consumer.
        with pytest.raises(PeerUnavailable):
            await a.send(b"\x01" * SMALL, timeout=0.3)
        # Cancelled while waiting: nothing sent, nothing broken.
        with trio.move_on_after(0.2):
            await a.send(b"\x02" * SMALL)
        assert a.is_open
        assert await b.receive() == bytes(SMALL)
        assert await b.receive() == bytes(SMALL)
        await a.send(b"\x03" * SMALL, timeout=2.0)
        assert await b.receive() == b"\x03" * SMALL
        with pytest.raises(PeerUnavailable):
            await b.receive(timeout=0.1)
        await a.send(b"after a receive timeout")
        assert await b.receive() == b"after a receive timeout"


async def test_frame_size_limits_are_checked_locally() -> None:
    async with channel_pair(max_frame=SMALL, window=2 * SMALL) as (a, _):
        with pytest.raises(ValueError):
            await a.send(b"")
        with pytest.raises(ValueError):
            await a.send(bytes(SMALL + 1))
        assert a.max_frame == SMALL


async def test_abort_looks_like_a_dead_peer() -> None:
    async with channel_pair() as (a, b):
        await a.send(b"before")
        a.abort()
        assert await b.receive() == b"before"
        with pytest.raises(PeerUnavailable) as caught:
            await b.receive()
        assert not isinstance(caught.value, ChannelClosed)


async def test_a_peer_that_ignores_credit_is_refused() -> None:
    async with raw_and_channel(max_frame=SMALL) as (raw, b):
        # Spend all credit legitimately, then send one frame more with the bare sealer.
        while raw.core.can_send(SMALL):
            await raw.stream.send_all(raw.core.seal_data(bytes(SMALL)))
        await raw.stream.send_all(raw.core.sealer.seal(b"over the limit"))
        with pytest.raises(ProtocolViolation):
            for _ in range(10_000):
                await b.receive()


async def test_receive_into_writes_frames_into_the_callers_buffer() -> None:
    frames = [os.urandom(n) for n in (10, 200_000, 1 << 20, 70_000, 5)]
    async with channel_pair() as (a, b):
        for frame in frames:
            await a.send(frame)
        out = bytearray(1 << 20)
        with pytest.raises(ValueError):
            await b.receive_into(bytearray(9))  # too small: the frame stays queued
        for frame in frames:
            n = await b.receive_into(memoryview(out))
            assert out[:n] == frame
        assert b.bytes_received == sum(map(len, frames))


async def test_nothing_behind_a_tampered_large_frame_is_delivered() -> None:
    async with raw_and_channel() as (raw, b):
        good = os.urandom(200_000)
        first = raw.core.seal_data(good)
        bad = bytearray(raw.core.seal_data(os.urandom(200_000)))
        bad[1000] ^= 0x40
        await raw.stream.send_all(first + bad + raw.core.seal_data(good))
        with trio.fail_after(3):
            while b.frames_received < 3:  # all three queued before the consumer looks
                await trio.sleep(0.01)
        assert await b.receive() == good
        for _ in range(2):
            with pytest.raises(ProtocolViolation):
                await b.receive()


async def test_an_exhausted_nonce_counter_closes_the_channel() -> None:
    async with channel_pair() as (a, b):
        await a.send(b"first")
        assert await b.receive() == b"first"
        a._core.sealer._counter = MAX_COUNTER + 1  # as after 2**64 frames
        with pytest.raises(ChannelClosed):
            await a.send(b"one too many")
        assert not a.is_open
        with pytest.raises(PeerUnavailable):
            await b.receive()
