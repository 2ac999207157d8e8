"""A second connection to a peer replaces the first without cutting a stream in flight
(real libp2p hosts on loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

from dandelion_p2p.identity import Identity
from dandelion_p2p.net.host import build_host
from dandelion_p2p.net.upgrade import IDLE_BEFORE_CLOSE, MAX_DRAINING_PER_PEER, GracefulUpgrades

SINK = "/test/sink/1"
CHUNK = b"x" * 65536


async def sink(stream: INetStream) -> None:
    """Counts what arrives until end of stream, then answers with the count."""
    total = 0
    while data := await read_some(stream):
        total += len(data)
    await stream.write(str(total).encode())
    await stream.close()


async def read_some(stream: INetStream) -> bytes:
    """What arrives next; empty at the end of the stream (py-libp2p raises there)."""
    try:
        return await stream.read(65536)
    except StreamEOF:
        return b""


@asynccontextmanager
async def upgrading_host(nursery: trio.Nursery) -> AsyncIterator[tuple[IHost, GracefulUpgrades]]:
    host = build_host(Identity.generate())
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        upgrades = GracefulUpgrades(host, DCUtRProtocol(host))
        nursery.start_soon(upgrades.run)
        host.set_stream_handler(SINK, sink)  # type: ignore[arg-type]
        yield host, upgrades


def addr_of(host: IHost) -> multiaddr.Multiaddr:
    for listener in host.get_network().listeners.values():
        return listener.get_addrs()[0]
    raise AssertionError("host does not listen")


async def test_a_replaced_connection_drains_its_streams_then_closes() -> None:
    async with trio.open_nursery() as nursery:
        async with upgrading_host(nursery) as (a, up_a), upgrading_host(nursery) as (b, up_b):
            await a.connect(PeerInfo(b.get_id(), [addr_of(b)]))
            swarm: Any = a.get_network()
            (first,) = swarm.get_connections(b.get_id())
            stream = await a.new_stream(b.get_id(), [SINK])
            sent = 0
            for _ in range(16):
                await stream.write(CHUNK)
                sent += len(CHUNK)

            second = await swarm.dial_addr(addr_of(b), b.get_id())
            assert second is not first
            # The first connection keeps carrying the stream it has...
            for _ in range(64):
                await stream.write(CHUNK)
                sent += len(CHUNK)
            assert not first.is_closed
            assert up_a.draining() == 1
            # ...while new streams take the second.
            other = await a.new_stream(b.get_id(), [SINK])
            assert other.muxed_conn is second.muxed_conn
            await other.write(b"y")
            await other.close_write()
            assert (await read_some(other)) == b"1"
            await other.close()

            await stream.close_write()
            reply = b""
            while chunk := await read_some(stream):
                reply += chunk
            assert int(reply) == sent
            await stream.close()

            with trio.fail_after(IDLE_BEFORE_CLOSE + 5):
                while len(swarm.get_connections(b.get_id())) > 1:
                    await trio.sleep(0.1)
            assert first.is_closed
            left = swarm.get_connections(b.get_id())
            assert [c.muxed_conn for c in left] == [second.muxed_conn], left
            assert up_a.drained + up_b.drained >= 1
            assert not second.is_closed
        nursery.cancel_scope.cancel()


async def test_a_peer_that_keeps_dialing_cannot_pile_up_draining_connections() -> None:
    async with trio.open_nursery() as nursery:
        async with upgrading_host(nursery) as (a, up_a), upgrading_host(nursery) as (b, _):
            await a.connect(PeerInfo(b.get_id(), [addr_of(b)]))
            swarm: Any = a.get_network()
            (first,) = swarm.get_connections(b.get_id())
            held = [await a.new_stream(b.get_id(), [SINK])]
            await held[0].write(b"z")
            for _ in range(MAX_DRAINING_PER_PEER + 1):
                await swarm.dial_addr(addr_of(b), b.get_id())
                # A stream left open on the newest connection keeps it from going idle.
                held.append(await a.new_stream(b.get_id(), [SINK]))
                await held[-1].write(b"z")
                assert up_a.draining() <= MAX_DRAINING_PER_PEER
            # The first one closes at once, streams or not; the newest and two draining stay.
            with trio.fail_after(IDLE_BEFORE_CLOSE):
                while len(swarm.get_connections(b.get_id())) > MAX_DRAINING_PER_PEER + 1:
                    await trio.sleep(0.05)
            assert first.is_closed
        nursery.cancel_scope.cancel()
