"""The data plane between real swarm nodes on loopback, in each of its three modes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from dandelion_p2p.dataplane.channel import Channel
from dandelion_p2p.dataplane.errors import ChannelClosed
from dandelion_p2p.dataplane.service import MAX_UNCLAIMED_CONNECTIONS, DataPlane
from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation, RemoteRejected
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.wire import RejectCode
from tests.swarm import public_settings, running_node, serve_node, swarm

MiB = 1024 * 1024
FRAME = 4 * MiB
TOTAL = 64 * MiB
LOOPBACK = "127.0.0.1"


@asynccontextmanager
async def planes(
    reach_a: bool, reach_b: bool, a_options: dict[str, Any] | None = None, **options: Any
) -> AsyncIterator[tuple[DataPlane, DataPlane, SwarmNode, SwarmNode]]:
    """Two connected nodes with a data plane each; ``options`` go to b's data plane."""
    async with swarm(2) as (a, b), trio.open_nursery() as nursery:
        plane_a = DataPlane(
            a.host, a.identity, listen_ip=LOOPBACK, reachable=reach_a, **(a_options or {})
        )
        plane_b = DataPlane(b.host, b.identity, listen_ip=LOOPBACK, reachable=reach_b, **options)
        await nursery.start(plane_a.run)
        await nursery.start(plane_b.run)
        yield plane_a, plane_b, a, b
        nursery.cancel_scope.cancel()


def frames(seed: int, total: int = TOTAL) -> list[bytes]:
    # One random block, each frame stamped with its index and seed so that a dropped,
    # duplicated or reordered frame changes the digest.
    block = os.urandom(FRAME)
    return [i.to_bytes(4, "big") + seed.to_bytes(4, "big") + block[8:]
            for i in range(total // FRAME)]


def digest(items: list[bytes]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item)
    return h.hexdigest()


async def exchange(channel: Channel, outgoing: list[bytes], expected: int) -> str:
    """Send ``outgoing`` while receiving ``expected`` frames; the digest of what came in."""
    h = hashlib.sha256()
    async with trio.open_nursery() as nursery:
        async def send() -> None:
            for frame in outgoing:
                await channel.send(frame)
        nursery.start_soon(send)
        for _ in range(expected):
            h.update(await channel.receive())
    return h.hexdigest()


@pytest.mark.parametrize(
    ("reach_a", "reach_b", "mode", "kind"),
    [
        (True, True, "dial-acceptor", "direct"),
        (True, False, "dial-opener", "direct"),
        (False, False, "stream", "relayed"),
    ],
)
async def test_64_mib_each_way_concurrently(
    reach_a: bool, reach_b: bool, mode: str, kind: str
) -> None:
    to_b, to_a = frames(1), frames(2)
    results: dict[str, Any] = {}
    done = trio.Event()

    async def serve(channel: Channel) -> None:
        results["b_mode"] = (channel.mode, channel.kind, channel.peer_id)
        results["b"] = await exchange(channel, to_a, len(to_b))
        done.set()

    async with planes(reach_a, reach_b) as (plane_a, plane_b, a, b):
        plane_b.register("test", serve)
        with trio.fail_after(30):
            channel = await plane_a.open(b.peer_id, "test")
            assert (channel.mode, channel.kind) == (mode, kind)
            results["a"] = await exchange(channel, to_b, len(to_a))
            await done.wait()
            await channel.aclose()
    assert results["b_mode"] == (mode, kind, a.peer_id)
    assert results["b"] == digest(to_b)
    assert results["a"] == digest(to_a)


# 9 s; flow control under a reader that keeps up is checked by default by the 64 MiB tests.
@pytest.mark.slow
async def test_a_consumer_pausing_8_s_breaks_neither_tcp_nor_stream_channels() -> None:
    sent = frames(3, total=48 * MiB)  # more than the 32 MiB window: the sender must wait
    got: dict[str, str] = {}

    async def slow(channel: Channel) -> None:
        await trio.sleep(8.0)
        got[channel.mode] = digest([await channel.receive() for _ in sent])

    async with planes(True, True) as (plane_a, plane_b, _, b):
        plane_b.register("slow", slow)
        started = time.monotonic()
        with trio.fail_after(30):
            direct = await plane_a.open(b.peer_id, "slow")
            relayed = await plane_a.open(b.peer_id, "slow", direct=False)
            assert (direct.kind, relayed.kind) == ("direct", "relayed")
            async with trio.open_nursery() as nursery:
                for channel in (direct, relayed):
                    async def push(channel: Channel = channel) -> None:
                        for frame in sent:
                            await channel.send(frame)
                    nursery.start_soon(push)
            while len(got) < 2:
                await trio.sleep(0.05)
        assert time.monotonic() - started >= 8.0
    assert got == {"dial-acceptor": digest(sent), "stream": digest(sent)}


async def test_unknown_forged_or_missing_tickets_are_refused() -> None:
    async with planes(True, True, ticket_timeout=0.5) as (_, plane_b, __, ___):
        assert plane_b.bound_port is not None

        async def refused(send: bytes) -> None:
            stream = await trio.open_tcp_stream(LOOPBACK, plane_b.bound_port)
            if send:
                await stream.send_all(send)
            # A reset is a refusal too.
            with trio.fail_after(3), contextlib.suppress(trio.BrokenResourceError):
                assert await stream.receive_some(100) == b""
            await stream.aclose()

        await refused(os.urandom(16))  # forged
        await refused(b"")  # silent until the ticket timeout
        expired = os.urandom(16)
        plane_b.tickets.expect(expired, plane_b.peer_id, expires_at=trio.current_time() - 1)
        await refused(expired)
        assert plane_b.refused_connections == 3


async def test_idle_connections_cannot_crowd_out_an_honest_dialer() -> None:
    async with planes(True, True) as (plane_a, plane_b, _, b):
        assert plane_b.bound_port is not None
        idle = [
            await trio.open_tcp_stream(LOOPBACK, plane_b.bound_port)
            for _ in range(MAX_UNCLAIMED_CONNECTIONS + 5)
        ]
        plane_b.register("echo", lambda channel: channel.send(b"hi"))
        with trio.fail_after(10):
            channel = await plane_a.open(b.peer_id, "echo")
            assert channel.mode == "dial-acceptor"
            assert await channel.receive() == b"hi"
        for stream in idle:
            await stream.aclose()


async def test_unknown_purpose_is_rejected() -> None:
    async with planes(True, True) as (plane_a, _, __, b):
        with pytest.raises(RemoteRejected) as caught:
            await plane_a.open(b.peer_id, "nothing-here")
        assert caught.value.code == RejectCode.NOT_FOUND


async def test_unreachable_endpoint_falls_back_to_the_stream() -> None:
    # b claims to be reachable at a port where nothing listens.
    async with planes(True, True, advertise="127.0.0.1:1") as (plane_a, plane_b, _, b):
        echoed = trio.Event()

        async def echo(channel: Channel) -> None:
            assert channel.mode == "stream"
            await channel.send(await channel.receive())
            echoed.set()

        plane_b.register("echo", echo)
        with trio.fail_after(20):
            channel = await plane_a.open(b.peer_id, "echo")
            assert channel.mode == "stream"
            await channel.send(b"ping")
            assert await channel.receive() == b"ping"
            await echoed.wait()
            await channel.aclose()


async def test_an_endpoint_that_swallows_the_ticket_falls_back_to_the_stream() -> None:
    """A connection that reaches someone else (here: a listener that never answers) is not
    taken for the peer: only an authentic first frame is."""
    async with trio.open_nursery() as nursery:
        silent = (await trio.open_tcp_listeners(0, host=LOOPBACK))[0]
        held: list[trio.SocketStream] = []

        async def swallow() -> None:
            while True:
                held.append(await silent.accept())

        nursery.start_soon(swallow)
        port = silent.socket.getsockname()[1]
        async with planes(
            True, True, a_options={"connect_timeout": 1.0}, advertise=f"127.0.0.1:{port}"
        ) as (plane_a, plane_b, _, b):
            plane_b.register("echo", lambda channel: channel.send(b"via the stream"))
            with trio.fail_after(10):
                channel = await plane_a.open(b.peer_id, "echo")
                assert channel.mode == "stream"
                assert await channel.receive() == b"via the stream"
        assert len(held) == 1
        nursery.cancel_scope.cancel()
    for stream in [*held, silent]:
        await stream.aclose()


class Proxy:
    """A TCP relay in front of a data endpoint that damages the opener's bytes at ``offset``:
    flips one bit, or cuts both directions off there."""

    def __init__(self, target: int, offset: int, *, cut: bool) -> None:
        self.target = target
        self.offset = offset
        self.cut = cut
        self.port = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(LOOPBACK, self.target)
        async with server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pipe, client, server, True, nursery.cancel_scope)
            nursery.start_soon(self._pipe, server, client, False, nursery.cancel_scope)

    async def _pipe(
        self, src: trio.SocketStream, dst: trio.SocketStream, damage: bool,
        scope: trio.CancelScope,
    ) -> None:
        seen = 0
        try:
            while data := await src.receive_some(65536):
                if damage and seen <= self.offset < seen + len(data):
                    at = self.offset - seen
                    if self.cut:
                        await dst.send_all(data[:at])
                        scope.cancel()  # both connections close: a peer that died
                        return
                    data = data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]
                await dst.send_all(data)
                seen += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


@asynccontextmanager
async def through_proxy(offset: int, *, cut: bool) -> AsyncIterator[
    tuple[DataPlane, SwarmNode, Callable[[], Any], list[Any]]
]:
    """Node a opens to node b over TCP through a damaging proxy; b's handler records what
    its ``receive`` calls gave, then the violations b counted."""
    outcome: list[Any] = []
    violations: list[RejectCode] = []
    finished = trio.Event()

    async def record(channel: Channel) -> None:
        try:
            while True:
                outcome.append(await channel.receive())
        except (PeerUnavailable, ProtocolViolation) as exc:
            outcome.append(exc)
        outcome.append(violations)
        finished.set()

    async with swarm(2) as (a, b), trio.open_nursery() as nursery:
        plane_b = DataPlane(
            b.host, b.identity, listen_ip=LOOPBACK, reachable=True,
            on_violation=lambda _peer, code: violations.append(code),
        )
        await nursery.start(plane_b.run)
        assert plane_b.bound_port is not None
        proxy = Proxy(plane_b.bound_port, offset, cut=cut)
        await nursery.start(proxy.run)
        plane_b.advertise = f"127.0.0.1:{proxy.port}"
        plane_b.register("victim", record)
        plane_a = DataPlane(a.host, a.identity, listen_ip=LOOPBACK, reachable=True)
        await nursery.start(plane_a.run)
        yield plane_a, b, finished.wait, outcome
        nursery.cancel_scope.cancel()


async def test_a_tampered_frame_raises_protocol_violation() -> None:
    async with through_proxy(offset=300_000, cut=False) as (plane_a, b, finished, outcome):
        with trio.fail_after(20):
            channel = await plane_a.open(b.peer_id, "victim")
            assert channel.mode == "dial-acceptor"
            with pytest.raises(PeerUnavailable):
                for _ in range(4):
                    await channel.send(os.urandom(MiB))
                # b dropped the connection on the bad frame: we learn it at the latest here.
                await channel.receive()
            await finished()
    *frames, error, violations = outcome
    assert isinstance(error, ProtocolViolation)
    assert all(isinstance(x, bytes) and len(x) == MiB for x in frames)
    assert violations == [RejectCode.BAD_SIGNATURE]


async def test_a_peer_cut_off_mid_frame_is_unavailable_not_a_short_read() -> None:
    async with through_proxy(offset=1_500_000, cut=True) as (plane_a, b, finished, outcome):
        with trio.fail_after(20):
            channel = await plane_a.open(b.peer_id, "victim")
            with pytest.raises(PeerUnavailable):
                for _ in range(4):
                    await channel.send(os.urandom(MiB))
                await channel.receive()
            await finished()
    # The first 1 MiB frame arrived whole; the second was cut inside.
    *frames, error, violations = outcome
    assert [len(x) for x in frames] == [MiB]
    assert isinstance(error, PeerUnavailable)
    assert not isinstance(error, ChannelClosed)
    assert violations == []


async def test_a_killed_stream_mode_peer_is_unavailable_not_closed() -> None:
    outcome: list[BaseException | int] = []
    finished = trio.Event()

    async def record(channel: Channel) -> None:
        try:
            while True:
                outcome.append(len(await channel.receive()))
        except PeerUnavailable as exc:
            outcome.append(exc)
        finished.set()

    async with running_node(public_settings()) as b, trio.open_nursery() as nursery:
        plane_b = DataPlane(b.host, b.identity, listen_ip=LOOPBACK, reachable=False)
        await nursery.start(plane_b.run)
        plane_b.register("victim", record)
        stop = trio.Event()
        a: SwarmNode = await nursery.start(
            serve_node, public_settings(bootstrap=(b.full_addrs()[0],)), stop
        )
        plane_a = DataPlane(a.host, a.identity, listen_ip=LOOPBACK, reachable=False)
        with trio.fail_after(20):
            async with trio.open_nursery() as inner:
                await inner.start(plane_a.run)
                channel = await plane_a.open(b.peer_id, "victim")
                assert channel.mode == "stream"
                for _ in range(3):
                    await channel.send(os.urandom(MiB))

                async def keep_sending() -> None:
                    # Dying with its data plane, the channel fails its own sender too.
                    with contextlib.suppress(PeerUnavailable):
                        while True:
                            await channel.send(os.urandom(MiB))

                inner.start_soon(keep_sending)
                await trio.sleep(0.05)
                inner.cancel_scope.cancel()  # the peer's data plane dies mid-transfer...
            stop.set()  # ...and its node with it
            await finished.wait()
        nursery.cancel_scope.cancel()
    assert all(n == MiB for n in outcome[:-1])
    assert len(outcome) >= 4
    assert isinstance(outcome[-1], PeerUnavailable)
    assert not isinstance(outcome[-1], ChannelClosed)
