"""Chunk transfers end in bounded time, and one peer cannot take every serve slot."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
from libp2p.abc import INetStream

from dandelion_p2p.dataset.chunk_protocol import MIN_PART_BYTES
from dandelion_p2p.dataset.chunks import chunk_hash
from dandelion_p2p.dataset.messages import (
    CHUNK_PROTOCOL,
    DATASET,
    MAX_REPLY,
    MAX_REQUEST,
    ChunkHeader,
    ChunkPart,
    GetChunk,
)
from dandelion_p2p.dataset.transfer import fetch_chunk, serve_chunks
from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.net.streams import close_quietly, read_message, write_message
from dandelion_p2p.wire import Reject, RejectCode
from tests.swarm import swarm

NAME = chunk_hash(b"what the trickling holder claims to have")


def trickling_holder(part: int, pause: float) -> Callable[[INetStream], Awaitable[None]]:
    """A holder announcing 1 MiB, then sending ``part`` bytes every ``pause`` seconds."""

    async def handler(stream: INetStream) -> None:
        try:
            msg = await read_message(stream, DATASET, MAX_REQUEST)
            assert isinstance(msg, GetChunk)
            await write_message(stream, ChunkHeader(chunk=msg.chunk, size=1 << 20))
            for _ in range((1 << 20) // part):
                await write_message(stream, ChunkPart(data=b"x" * part))
                await trio.sleep(pause)
        except Exception:
            pass
        finally:
            await close_quietly(stream)

    return handler


async def test_a_holder_sending_slowly_is_cut_off_at_the_overall_deadline() -> None:
    async with swarm(2) as (holder, fetcher):
        holder.host.set_stream_handler(CHUNK_PROTOCOL, trickling_holder(MIN_PART_BYTES, 0.3))
        await fetcher.connect_peer(holder.peer_id)
        started = trio.current_time()
        # Each part arrives well within the per-part timeout; the whole would take ~5 s.
        with pytest.raises(PeerUnavailable, match="too slow"):
            await fetch_chunk(fetcher.host, holder.peer_id, NAME, min_rate=1 << 20, grace=0.5)
        assert trio.current_time() - started < 3.0


async def test_tiny_parts_are_a_violation() -> None:
    async with swarm(2) as (holder, fetcher):
        holder.host.set_stream_handler(CHUNK_PROTOCOL, trickling_holder(1, 0.0))
        await fetcher.connect_peer(holder.peer_id)
        with pytest.raises(ProtocolViolation) as exc:
            await fetch_chunk(fetcher.host, holder.peer_id, NAME)
        assert exc.value.code == RejectCode.INVALID_FIELD


async def _open(reader: SwarmNode, server: SwarmNode, name: str) -> tuple[INetStream, object]:
    stream = await reader.host.new_stream(server.peer_id, [CHUNK_PROTOCOL])
    await write_message(stream, GetChunk(chunk=name))
    return stream, await read_message(stream, DATASET, MAX_REPLY)


async def test_a_slow_reader_holds_two_slots_at_most_and_loses_them_at_the_deadline() -> None:
    data = bytes(range(256)) * (64 * 1024)  # 16 MiB: far more than the stream buffers hold
    name = chunk_hash(data)
    async with swarm(2) as (server, reader):
        server.host.set_stream_handler(
            CHUNK_PROTOCOL,
            serve_chunks(lambda n: data if n == name else None, min_rate=64 << 20, grace=1.0),
        )
        await reader.connect_peer(server.peer_id)
        held = []
        for _ in range(2):  # opened, never read past the header
            stream, header = await _open(reader, server, name)
            assert isinstance(header, ChunkHeader)
            held.append(stream)
        third, reply = await _open(reader, server, name)
        assert isinstance(reply, Reject) and reply.code == RejectCode.RATE_LIMITED
        await close_quietly(third)
        await trio.sleep(2.0)  # past the 1.25 s deadline of both sends
        fourth, header = await _open(reader, server, name)
        assert isinstance(header, ChunkHeader)
        for stream in (*held, fourth):
            await close_quietly(stream)
