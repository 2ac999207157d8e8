"""Request streams kept for the next request to the same peer (``net.request_streams``), and
the responder that answers requests in turn on one stream (``serve_requests(keep_alive=)``),
on real libp2p hosts over loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation, RemoteRejected
from dandelion_p2p.net import request_streams
from dandelion_p2p.net.dht.messages import (
    DHT,
    PROTOCOL_ID,
    PROTOCOL_ID_ONE_PER_STREAM,
    FindNode,
    Nodes,
    PeerRef,
)
from dandelion_p2p.net.dht.node import DHTNode
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.net.request_streams import RequestStreams
from dandelion_p2p.net.streams import read_message, serve_requests, write_message
from dandelion_p2p.wire import Message, RejectCode
from dandelion_p2p.wire.framing import HEADER
from tests.swarm import swarm

KEPT = "/test/kept/1.1.0"
ONE_PER_STREAM = "/test/kept/1.0.0"
FIND = FindNode(target=b"t" * 32)


class Responder:
    """Answers every request with ``Nodes``, counting the streams and requests it served."""

    def __init__(self) -> None:
        self.streams = 0
        self.open = 0
        self.requests = 0
        self.banned: set[ID] = set()

    async def answer(self, peer_id: ID, msg: Message) -> Message:
        if isinstance(msg, FindNode) and msg.target == b"b" * 32:
            raise ProtocolViolation(RejectCode.MALFORMED, "a target the test refuses")
        self.requests += 1
        return Nodes(closer=())

    def handler(
        self, keep_alive: float, timeout: float = 5.0
    ) -> Callable[[INetStream], Awaitable[None]]:
        serve = serve_requests(DHT, self.answer, max_request=4096, timeout=timeout,
                               keep_alive=keep_alive, refuse=self.banned.__contains__)

        async def counted(stream: INetStream) -> None:
            self.streams += 1
            self.open += 1
            try:
                await serve(stream)
            finally:
                self.open -= 1

        return counted


@asynccontextmanager
async def pair(keep_alive: float = 10.0) -> AsyncIterator[tuple[SwarmNode, SwarmNode, Responder]]:
    async with swarm(2) as (requester, responder_node):
        responder = Responder()
        responder_node.host.set_stream_handler(TProtocol(KEPT), responder.handler(keep_alive))
        responder_node.host.set_stream_handler(TProtocol(ONE_PER_STREAM),
                                               responder.handler(0.0))
        yield requester, responder_node, responder


def streams_of(requester: SwarmNode, **kwargs: Any) -> RequestStreams:
    return RequestStreams(requester.host, (KEPT, ONE_PER_STREAM), reusable=KEPT, **kwargs)


async def ask(streams: RequestStreams, to: SwarmNode, msg: Message = FIND) -> Message:
    return await streams.request(to.peer_id, msg, DHT, max_reply=4096, timeout=5.0)


async def test_requests_in_turn_share_one_stream() -> None:
    async with pair() as (requester, to, responder):
        streams = streams_of(requester)
        for _ in range(10):
            assert isinstance(await ask(streams, to), Nodes)
        assert (responder.streams, responder.requests) == (1, 10)
        assert streams.reused == 9
        assert streams.idle == 1


async def test_a_responder_that_serves_one_request_per_stream_gets_a_stream_each() -> None:
    async with swarm(2) as (requester, to):
        responder = Responder()
        to.host.set_stream_handler(TProtocol(ONE_PER_STREAM), responder.handler(0.0))
        streams = streams_of(requester)
        for _ in range(3):
            assert isinstance(await ask(streams, to), Nodes)
        assert (responder.streams, streams.reused, streams.idle) == (3, 0, 0)


async def test_a_kept_stream_the_responder_closed_costs_a_fresh_one_not_the_request() -> None:
    # The responder keeps nothing open (0.3 s after a reply it closes), and the requester's
    # own bound is loose: the closed stream is found out and the request sent again.
    async with pair(keep_alive=0.0) as (requester, to, responder):
        to.host.set_stream_handler(TProtocol(KEPT), responder.handler(0.0))
        streams = streams_of(requester, reuse_within=60.0)
        assert isinstance(await ask(streams, to), Nodes)
        await trio.sleep(0.3)
        assert isinstance(await ask(streams, to), Nodes)
        assert responder.streams == 2
        assert responder.requests == 2


async def test_a_request_that_fails_on_a_kept_stream_is_sent_again_on_a_fresh_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The requester does not see that the responder closed the kept stream (as when the
    # close is still on its way): the request fails there and goes out again.
    monkeypatch.setattr(request_streams, "_looks_open", lambda stream: True)
    async with pair() as (requester, to, responder):
        to.host.set_stream_handler(TProtocol(KEPT), responder.handler(0.0))
        streams = streams_of(requester, reuse_within=60.0)
        await ask(streams, to)
        await trio.sleep(0.3)
        started = trio.current_time()
        assert isinstance(await ask(streams, to), Nodes)
        assert trio.current_time() - started < 5.0
        assert (responder.streams, responder.requests, streams.reused) == (2, 2, 0)


async def test_a_frame_nobody_asked_for_is_never_taken_for_the_next_reply() -> None:
    async with swarm(2) as (requester, to):
        served = []

        async def twice(stream: INetStream) -> None:
            served.append(stream)
            with contextlib.suppress(PeerUnavailable):
                await read_message(stream, DHT, 4096)
                await write_message(stream, Nodes(closer=()))
                await write_message(stream, Nodes(closer=()))  # nobody asked for this one
                await read_message(stream, DHT, 4096)  # a second request on it would come here

        to.host.set_stream_handler(TProtocol(KEPT), twice)
        streams = streams_of(requester)
        await ask(streams, to)
        await trio.sleep(0.2)
        with trio.fail_after(5.0):
            await ask(streams, to)
        assert (len(served), streams.reused) == (2, 0)


async def test_kept_streams_are_closed_soon_after_the_bound_on_both_sides() -> None:
    async with pair() as (requester, to, responder), trio.open_nursery() as nursery:
        streams = streams_of(requester, reuse_within=0.5)
        nursery.start_soon(streams.run)
        await ask(streams, to)
        assert (streams.idle, responder.open) == (1, 1)
        await trio.sleep(1.0)
        # The responder (whose own wait is 10 s) ended its side because the requester did.
        assert (streams.idle, responder.open) == (0, 0)
        nursery.cancel_scope.cancel()


async def answered_once(
    requester: SwarmNode, to: SwarmNode, keep_alive: float, timeout: float
) -> INetStream:
    """A stream of ``KEPT`` on which one request was answered, the responder waiting
    ``keep_alive`` for the next and allowing each ``timeout``."""
    to.host.set_stream_handler(TProtocol(KEPT), Responder().handler(keep_alive, timeout))
    stream = await requester.host.new_stream(to.peer_id, [TProtocol(KEPT)])
    await write_message(stream, FIND)
    assert isinstance(await read_message(stream, DHT, 4096), Nodes)
    return stream


async def test_a_partial_request_on_a_kept_stream_is_held_only_the_request_timeout() -> None:
    async with swarm(2) as (requester, to):
        stream = await answered_once(requester, to, keep_alive=5.0, timeout=0.3)
        await stream.write(HEADER.pack(4000) + b"x" * 3000)  # and the rest never
        started = trio.current_time()
        with trio.fail_after(3.0), pytest.raises(PeerUnavailable):
            await read_message(stream, DHT, 4096)
        assert trio.current_time() - started < 2.0  # 0.3 s, not the 5 s keep-alive


async def test_a_peer_banned_while_its_stream_is_kept_is_refused_the_next_request() -> None:
    async with pair() as (requester, to, responder):
        streams = streams_of(requester)
        await ask(streams, to)
        responder.banned.add(requester.peer_id)
        with pytest.raises(RemoteRejected) as refused:
            await ask(streams, to)
        assert refused.value.code == RejectCode.FORBIDDEN
        assert (responder.requests, streams.idle) == (1, 0)


async def test_a_stream_idle_past_the_bound_is_not_reused() -> None:
    async with pair() as (requester, to, responder):
        streams = streams_of(requester, reuse_within=0.2)
        await ask(streams, to)
        await trio.sleep(0.3)
        await ask(streams, to)
        assert (responder.streams, streams.reused) == (2, 0)


async def test_a_stream_on_a_connection_being_replaced_is_not_reused() -> None:
    async with pair() as (requester, to, responder):
        streams = streams_of(requester)
        await ask(streams, to)
        network: Any = requester.host.get_network()
        (first,) = network.get_connections(to.peer_id)
        second = await network.dial_addr(multiaddr.Multiaddr(to.full_addrs()[0]), to.peer_id)
        assert second is not first
        await ask(streams, to)
        assert (responder.streams, streams.reused) == (2, 0)
        # The stream kept now runs on the connection the swarm keeps (which of the two that
        # is depends on which peer's id is lower).
        (kept,) = streams._idle[to.peer_id]
        probe = await requester.host.new_stream(to.peer_id, [TProtocol(ONE_PER_STREAM)])
        assert kept.stream.muxed_conn is probe.muxed_conn
        await probe.close()


async def test_a_reject_closes_the_stream_on_both_sides() -> None:
    async with pair() as (requester, to, responder):
        streams = streams_of(requester)
        with pytest.raises(RemoteRejected):
            await ask(streams, to, FindNode(target=b"b" * 32))
        assert streams.idle == 0
        await ask(streams, to)
        assert responder.streams == 2


async def test_idle_streams_are_bounded_per_peer_and_in_all() -> None:
    async with pair() as (requester, to, responder):
        streams = streams_of(requester, per_peer=2, total=3)
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(ask, streams, to)
        assert responder.streams == 6
        assert streams.idle == 2
        async with swarm(2) as (other, _):
            other.host.set_stream_handler(TProtocol(KEPT), responder.handler(10.0))
            await requester.connect_peer(other.peer_id, other.full_addrs()[:1])
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(ask, streams, other)
            assert streams.idle == 3


async def test_a_responder_closes_a_kept_stream_nobody_uses() -> None:
    async with swarm(2) as (requester, to):
        stream = await answered_once(requester, to, keep_alive=0.3, timeout=0.2)
        with trio.fail_after(3.0), pytest.raises(PeerUnavailable):
            # Nothing more is sent: the responder waits 0.3 s, then ends the stream.
            await read_message(stream, DHT, 4096)


async def test_dht_rpcs_to_one_server_reuse_a_stream_and_an_older_server_is_still_served(
) -> None:
    async with swarm(3) as nodes:
        dht = nodes[0].dht
        assert isinstance(dht, DHTNode)
        before = dht.streams.reused
        for _ in range(5):
            await dht.find_closest(b"x" * 32, timeout=5.0)
        assert dht.streams.reused > before
        # A server that speaks only 1.0.0 (one request per stream). Streams kept from before
        # are not used (they were agreed under 1.1.0): each request negotiates anew.
        dht.streams.reuse_within = 0.0
        old = nodes[2]
        old.host.remove_stream_handler(TProtocol(PROTOCOL_ID))
        responder = Responder()
        old.host.set_stream_handler(TProtocol(PROTOCOL_ID_ONE_PER_STREAM),
                                    responder.handler(0.0))
        ref = PeerRef(peer_id=old.peer_id.to_bytes(), addrs=tuple(old.full_addrs()))
        for _ in range(2):
            assert isinstance(await dht._rpc(ref, FindNode(target=b"y" * 32)), Nodes)
        assert (responder.requests, responder.streams) == (2, 2)
