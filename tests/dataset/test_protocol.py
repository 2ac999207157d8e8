"""The dataset protocols between real libp2p hosts on loopback."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID

from dandelion_p2p.dataset.chunks import chunk_hash
from dandelion_p2p.dataset.client import DatasetClient
from dandelion_p2p.dataset.leases import LeaseBook
from dandelion_p2p.dataset.manifest import Manifest
from dandelion_p2p.dataset.messages import (
    CHUNK_PROTOCOL,
    DATASET,
    LEASE_PROTOCOL,
    MAX_REPLY,
    MAX_REQUEST,
    Complete,
    GetChunk,
    LeaseGrant,
    LeaseRequest,
    Receipt,
)
from dandelion_p2p.dataset.server import DatasetServer
from dandelion_p2p.dataset.transfer import fetch_chunk
from dandelion_p2p.errors import RemoteRejected
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht.messages import PeerRef
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.net.streams import close_quietly, read_message, request, write_message
from dandelion_p2p.runconfig.publication import derive_run_id
from dandelion_p2p.runconfig.schema import DatasetConfig
from dandelion_p2p.wire import Message, Reject, RejectCode
from dandelion_p2p.wire.framing import HEADER
from tests.dataset.helpers import dataset_client, packed_dataset, serve_dataset
from tests.swarm import public_settings, running_node, serve_node, swarm


@dataclass
class Setup:
    nodes: list[SwarmNode]
    server: DatasetServer
    manifest: Manifest
    run: str

    def server_ref(self) -> PeerRef:
        node = self.nodes[0]
        return PeerRef(peer_id=node.identity.peer_id_bytes, addrs=tuple(node.public_addrs()))


@asynccontextmanager
async def dataset_swarm(tmp_path: Path, count: int = 3) -> AsyncIterator[Setup]:
    async with swarm(count) as nodes:
        owner = nodes[0]
        data_dir, manifest = packed_dataset(tmp_path, owner.identity)
        run = derive_run_id(owner.identity.peer_id_bytes, "tiny")
        server = await serve_dataset(
            owner, run, manifest, data_dir, tmp_path / "leases.sqlite",
            DatasetConfig(lease_seconds=30, max_leases_per_peer=2),
        )
        try:
            yield Setup(nodes, server, manifest, run)
        finally:
            server.book.close()


async def test_lease_fetch_complete_and_a_flipped_byte_is_fetched_again(tmp_path: Path) -> None:
    async with dataset_swarm(tmp_path) as s:
        holder = dataset_client(s.nodes[1], s.run, tmp_path / "cache-b")
        holder.install()
        lease = await holder.lease()
        data = await holder.fetch(lease.chunk, expected_size=lease.size)
        assert chunk_hash(data) == lease.chunk and len(data) == lease.size
        ack = await holder.complete(lease)
        assert (ack.completed, ack.total) == (1, len(s.manifest.chunks))

        # The holder's copy rots (or the holder lies): one byte flipped.
        cached = holder.path(lease.chunk)
        assert cached is not None
        raw = bytearray(cached.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        cached.write_bytes(bytes(raw))

        fetcher = dataset_client(s.nodes[2], s.run, tmp_path / "cache-c")
        fetcher.install()
        assert await fetcher.holders(lease.chunk) == [s.nodes[1].identity.peer_id_bytes]
        got = await fetcher.fetch(lease.chunk)
        assert got == data
        bad_holder = s.nodes[1].peer_id.to_base58()
        assert [peer for peer, _ in fetcher.rejected_holders] == [bad_holder]
        assert "do not hash" in fetcher.rejected_holders[0][1]
        assert s.nodes[2].violations.get(bad_holder, 0) >= 1
        assert s.server.book.receipts_per_chunk(0)[lease.chunk] == 1


async def _raw_exchange(node: SwarmNode, peer: ID, protocol: str, payload: bytes) -> Reject:
    stream = await node.host.new_stream(peer, [protocol])  # type: ignore[list-item]
    try:
        await stream.write(payload)
        reply = await read_message(stream, DATASET, MAX_REPLY)
    finally:
        await close_quietly(stream)
    assert isinstance(reply, Reject)
    return reply


async def _rejected(coro: object) -> int:
    try:
        await coro  # type: ignore[misc]
    except RemoteRejected as exc:
        return exc.code
    raise AssertionError("not rejected")


async def test_bad_requests_get_reject_codes_and_the_server_keeps_serving(
    tmp_path: Path,
) -> None:
    async with dataset_swarm(tmp_path) as s, AsyncExitStack() as stack:
        server_id = s.nodes[0].peer_id

        async def attacker() -> SwarmNode:
            # A fresh peer for each attack: the server bans a peer after a few of them.
            boot = (s.nodes[0].full_addrs()[0],)
            return await stack.enter_async_context(running_node(public_settings(bootstrap=boot)))

        async def chunk_request(node: SwarmNode, name: str) -> Reject:
            stream = await node.host.new_stream(server_id, [CHUNK_PROTOCOL])
            try:
                await write_message(stream, GetChunk(chunk=name))
                reply = await read_message(stream, DATASET, MAX_REPLY)
            finally:
                await close_quietly(stream)
            assert isinstance(reply, Reject)
            return reply

        async def ask(node: SwarmNode, msg: Message) -> Message:
            return await request(node.host, server_id, LEASE_PROTOCOL, msg, DATASET,
                                 max_reply=MAX_REPLY, timeout=5.0)

        first = await attacker()
        assert await _rejected(
            fetch_chunk(first.host, server_id, "ab" * 32)) == RejectCode.NOT_FOUND
        assert await _rejected(
            ask(first, LeaseRequest(run="someone-elses-run"))) == RejectCode.NOT_FOUND
        names = ["../../etc/passwd", "../manifest.json", "/etc/shadow",
                 s.manifest.chunks[0].hash + "/../x", s.manifest.chunks[0].hash.upper()]
        # Two malformed requests each: the second is still answered, then the peer is banned.
        node = first
        for i, name in enumerate(names):
            if i % 2 == 0:
                node = await attacker()
            reply = await chunk_request(node, name)
            assert reply.code == RejectCode.INVALID_FIELD, name

        oversized = HEADER.pack(MAX_REQUEST + 1) + b"\x00" * (MAX_REQUEST + 1)
        node = await attacker()
        for protocol in (CHUNK_PROTOCOL, LEASE_PROTOCOL):
            reply = await _raw_exchange(node, server_id, protocol, oversized)
            assert reply.code == RejectCode.TOO_LARGE
        assert s.nodes[0].is_banned(node.peer_id)

        async def receipt_rejection(make: Callable[[SwarmNode, LeaseGrant], Receipt]) -> int:
            node = await attacker()
            grant = await ask(node, LeaseRequest(run=s.run))
            assert isinstance(grant, LeaseGrant)
            code = await _rejected(ask(node, Complete(receipt=make(node, grant))))
            # Whoever cheats with receipts is banned at once.
            assert s.nodes[0].is_banned(node.peer_id)
            assert await _rejected(ask(node, LeaseRequest(run=s.run))) == RejectCode.FORBIDDEN
            return code

        def fields(grant: LeaseGrant) -> dict[str, Any]:
            return dict(run=s.run, lease_id=grant.lease_id, epoch=grant.epoch,
                        chunk=grant.chunk, samples=grant.samples, possession=bytes(32))

        def unsigned(node: SwarmNode, grant: LeaseGrant) -> Receipt:
            return Receipt(peer=node.identity.peer_id_bytes, **fields(grant))

        def forged(node: SwarmNode, grant: LeaseGrant) -> Receipt:
            receipt = unsigned(node, grant)
            return replace(receipt, signature=Identity.generate().sign(receipt.signed_bytes()))

        def in_another_name(node: SwarmNode, grant: LeaseGrant) -> Receipt:
            victim = s.nodes[1].identity
            receipt = Receipt(peer=victim.peer_id_bytes, **fields(grant))
            return replace(receipt, signature=victim.sign(receipt.signed_bytes()))

        assert await receipt_rejection(unsigned) == RejectCode.BAD_SIGNATURE
        assert await receipt_rejection(forged) == RejectCode.BAD_SIGNATURE
        assert await receipt_rejection(in_another_name) == RejectCode.FORBIDDEN
        assert s.server.book.completed(0) == 0

        honest = dataset_client(s.nodes[1], s.run, tmp_path / "cache-b",
                                servers=[s.server_ref()])
        lease = await honest.lease()
        assert chunk_hash(await honest.fetch(lease.chunk)) == lease.chunk
        ack = await honest.complete(lease)
        assert ack.completed == 1


async def test_an_epoch_across_two_peers_ends_with_one_receipt_per_chunk(tmp_path: Path) -> None:
    async with dataset_swarm(tmp_path) as s:
        clients = [dataset_client(n, s.run, tmp_path / f"cache-{i}")
                   for i, n in enumerate(s.nodes[1:])]
        holding: dict[str, str] = {}
        done: list[str] = []

        async def train(client: DatasetClient) -> None:
            while True:
                reply = await client.try_lease()
                if not isinstance(reply, LeaseGrant) or reply.epoch > 0:
                    return
                who = ID(client.signer.peer_id_bytes).to_base58()
                assert reply.chunk not in holding, "one chunk leased to two peers at once"
                holding[reply.chunk] = who
                await client.fetch(reply.chunk, expected_size=reply.size)
                await trio.sleep(0.01)
                del holding[reply.chunk]
                await client.complete(reply)
                done.append(reply.chunk)

        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(train, client)
        assert sorted(done) == sorted(c.hash for c in s.manifest.chunks)
        assert set(s.server.book.receipts_per_chunk(0).values()) == {1}


@dataclass
class TwoServers:
    peer: SwarmNode
    servers: list[SwarmNode]
    stops: list[trio.Event]
    books: list[LeaseBook]
    manifest: Manifest
    run: str


@asynccontextmanager
async def two_servers_of_one_run(
    tmp_path: Path, config: DatasetConfig | None = None
) -> AsyncIterator[TwoServers]:
    """A peer and two dataset servers of one run, each in its own task to stop alone."""
    async with swarm(1) as (peer,), trio.open_nursery() as nursery:
        boot = tuple(peer.full_addrs()[:1])
        stops = [trio.Event(), trio.Event()]
        servers: list[SwarmNode] = [
            await nursery.start(serve_node, public_settings(bootstrap=boot), stop)
            for stop in stops
        ]
        owner = servers[0].identity
        data_dir, manifest = packed_dataset(tmp_path, owner)
        run = derive_run_id(owner.peer_id_bytes, "tiny")
        # The second server is not the owner: it serves the owner's signed dataset.
        books = [
            (await serve_dataset(node, run, manifest, data_dir,
                                 tmp_path / f"leases-{i}.sqlite", config)).book
            for i, node in enumerate(servers)
        ]
        yield TwoServers(peer, servers, stops, books, manifest, run)
        for stop in stops:
            stop.set()


async def test_two_servers_serve_one_run_and_a_peer_fails_over(tmp_path: Path) -> None:
    async with two_servers_of_one_run(tmp_path) as two:
        servers, books = two.servers, two.books
        # A server that vanished may leave a connection that only times out.
        client = dataset_client(two.peer, two.run, tmp_path / "cache", announce_holdings=False,
                                request_timeout=2.0)
        assert set(await client.servers(refresh=True)) == {n.identity.peer_id_bytes
                                                            for n in servers}
        first = await client.lease()
        await client.fetch(first.chunk, expected_size=first.size)
        granted_by = next(i for i, n in enumerate(servers)
                          if n.identity.peer_id_bytes == client.granted_by(first))
        two.stops[granted_by].set()
        await trio.sleep(0.5)

        other = 1 - granted_by
        second = await client.lease()
        assert client.granted_by(second) == servers[other].identity.peer_id_bytes
        data = await client.fetch(second.chunk, expected_size=second.size)
        assert chunk_hash(data) == second.chunk
        assert (await client.complete(second)).completed == 1
        assert books[other].completed(0) == 1


async def test_leases_of_the_same_number_from_two_servers_each_get_their_receipt(
    tmp_path: Path,
) -> None:
    async with two_servers_of_one_run(tmp_path, DatasetConfig(max_leases_per_peer=16)) as two:
        refs = [PeerRef(peer_id=n.identity.peer_id_bytes, addrs=tuple(n.direct_addrs()))
                for n in two.servers]
        client = dataset_client(two.peer, two.run, tmp_path / "cache", servers=refs,
                                announce_holdings=False)
        total = len(two.manifest.chunks)
        # The first server's chunks run out (this epoch's and the next's), then the second
        # grants its own, numbered alike.
        grants = [await client.lease() for _ in range(4 * total)]
        assert [b.status(time.time())["active_leases"] for b in two.books] == [2 * total] * 2
        named_alike = {(g.lease_id, g.chunk, g.epoch) for g in grants}
        assert len(named_alike) < len(grants), "the servers should number leases alike here"
        for grant in grants:
            await client.complete(grant)
        assert [book.completed(0) for book in two.books] == [total, total]
        assert [book.completed(1) for book in two.books] == [total, total]
