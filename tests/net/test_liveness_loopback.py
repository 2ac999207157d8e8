"""Connection liveness over real libp2p hosts on loopback, through a TCP relay of our own
that can stop forwarding (a black-holed path)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.peerinfo import PeerInfo

from dandelion_p2p.identity import Identity
from dandelion_p2p.net.host import build_host
from dandelion_p2p.net.liveness import ConnectionLiveness
from dandelion_p2p.net.liveness_core import LivenessSettings

FAST = LivenessSettings(interval=0.4, dead_after=1.5, check_every=0.1)


class PausableForwarder:
    """Forwards TCP connections to ``target_port``; ``pause`` stops moving bytes without
    closing anything, as a path that silently drops packets does."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.moving = trio.Event()
        self.moving.set()
        self.port = 0

    def pause(self) -> None:
        self.moving = trio.Event()

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        while True:
            await self.moving.wait()
            data = await src.receive_some(65536)
            if not data:
                return
            await self.moving.wait()
            await dst.send_all(data)

    async def _handle(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server)
            nursery.start_soon(self._pump, server, client)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)


def tcp_port(host: IHost) -> int:
    for listener in host.get_network().listeners.values():
        for addr in listener.get_addrs():
            return int(addr.value_for_protocol("tcp"))
    raise AssertionError("host does not listen")


@asynccontextmanager
async def watched_host(nursery: trio.Nursery) -> AsyncIterator[tuple[IHost, ConnectionLiveness]]:
    host = build_host(Identity.generate())
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        liveness = ConnectionLiveness(host, FAST)
        nursery.start_soon(liveness.run)
        yield host, liveness


async def connect_through(host: IHost, target: IHost, port: int) -> None:
    info = PeerInfo(target.get_id(), [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")])
    with trio.fail_after(10):
        await host.connect(info)


async def test_an_idle_connection_that_answers_pings_is_kept() -> None:
    async with trio.open_nursery() as nursery:
        async with watched_host(nursery) as (a, live_a), watched_host(nursery) as (b, live_b):
            await connect_through(b, a, tcp_port(a))
            await trio.sleep(FAST.dead_after * 2)
            assert b.get_network().get_connections(a.get_id())
            assert live_a.closed_dead == live_b.closed_dead == 0
            # Yamux pings went out and their answers were noticed as inbound bytes.
            (conn,) = b.get_network().get_connections(a.get_id())
            assert live_b.tracker.quiet_for(id(conn), trio.current_time()) < FAST.dead_after
            assert len(live_b._watched) == 1
        nursery.cancel_scope.cancel()


async def test_a_black_holed_connection_is_closed_within_the_bound() -> None:
    async with trio.open_nursery() as nursery:
        async with watched_host(nursery) as (a, _live_a), watched_host(nursery) as (b, live_b):
            forwarder = PausableForwarder(tcp_port(a))
            await nursery.start(forwarder.run)
            await connect_through(b, a, forwarder.port)
            await trio.sleep(FAST.interval * 2)
            assert b.get_network().get_connections(a.get_id())
            forwarder.pause()
            paused_at = trio.current_time()
            with trio.fail_after(FAST.bound + 5):
                while b.get_network().get_connections(a.get_id()):
                    await trio.sleep(0.05)
            took = trio.current_time() - paused_at
            assert live_b.closed_dead == 1
            # Not before it had been silent for dead_after (less what arrived just before).
            assert took >= FAST.dead_after - FAST.interval - FAST.check_every
            assert took <= FAST.bound + 1.0
        nursery.cancel_scope.cancel()


async def test_a_connection_busy_with_data_is_never_pinged_to_death() -> None:
    """A stream sending for longer than dead_after: its inbound window updates and data
    keep both ends alive even though the reader is slow."""
    received: list[int] = []

    async def slow_sink(stream: object) -> None:
        while True:
            data = await stream.read(65536)  # type: ignore[attr-defined]
            if not data:
                break
            received.append(len(data))
            await trio.sleep(0.01)
        await stream.close()  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        async with watched_host(nursery) as (a, live_a), watched_host(nursery) as (b, live_b):
            a.set_stream_handler("/test/sink/1", partial(slow_sink))
            await connect_through(b, a, tcp_port(a))
            stream = await b.new_stream(a.get_id(), ["/test/sink/1"])
            end = trio.current_time() + FAST.dead_after * 2
            while trio.current_time() < end:
                await stream.write(b"x" * 65536)
            await stream.close()
            assert sum(received) > 0
            assert live_a.closed_dead == live_b.closed_dead == 0
            assert b.get_network().get_connections(a.get_id())
        nursery.cancel_scope.cancel()
