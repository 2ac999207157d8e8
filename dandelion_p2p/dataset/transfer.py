"""Chunk transfer over libp2p: serve chunks by hash, fetch and verify them.

The rules are ``chunk_protocol``'s; this module moves its frames over libp2p streams and keeps
its deadlines. The server answers ``GetChunk`` with a ``ChunkHeader`` and the bytes in
``ChunkPart`` frames of at most 1 MiB; the fetcher bounds every frame before decoding it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.dataset.chunk_protocol import (
    DEADLINE_GRACE,
    MAX_CONCURRENT_SERVES,
    MAX_SERVES_PER_PEER,
    MAX_SERVES_PER_PREFIX,
    MIN_RATE,
    ChunkReceiver,
    ChunkSource,
    ServeLimits,
    ServeSlots,
    chunk_to_serve,
    transfer_deadline,
)
from dandelion_p2p.dataset.chunks import MAX_CHUNK_BYTES
from dandelion_p2p.dataset.messages import (
    CHUNK_PROTOCOL,
    DATASET,
    MAX_PART_FRAME,
    MAX_REPLY,
    MAX_REQUEST,
    PART_BYTES,
    ChunkHeader,
    ChunkPart,
    GetChunk,
)
from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation
from dandelion_p2p.net.origin import is_direct_connection, remote_ip
from dandelion_p2p.net.streams import (
    NOT_A_FAULT,
    Refuse,
    ViolationSink,
    close_quietly,
    read_message,
    refusal,
    write_message,
)
from dandelion_p2p.networks import public_network_of
from dandelion_p2p.wire import Reject, RejectCode

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0
PART_TIMEOUT = 30.0
"""Seconds one part may take to arrive or to be sent: a stalled peer is dropped."""


def serve_chunks(
    source: ChunkSource,
    *,
    on_violation: ViolationSink | None = None,
    refuse: Refuse | None = None,
    refuse_chunk: Callable[[ID, str], str | None] | None = None,
    max_concurrent: int = MAX_CONCURRENT_SERVES,
    max_per_peer: int = MAX_SERVES_PER_PEER,
    max_per_prefix: int = MAX_SERVES_PER_PREFIX,
    min_rate: float = MIN_RATE,
    grace: float = DEADLINE_GRACE,
) -> Callable[[INetStream], Awaitable[None]]:
    """A stream handler for ``CHUNK_PROTOCOL``: one chunk per stream, read from ``source``.

    ``source(name)`` maps a valid chunk name to its file, or None when it is not held. Bad
    requests are answered with a ``Reject`` and reported; none of them stops the handler.
    At most ``max_concurrent`` chunks are sent at once, ``max_per_peer`` to one peer and
    ``max_per_prefix`` to the peers of one network, each within ``transfer_deadline`` (a slow
    reader is cut off and its slot freed). ``refuse_chunk(peer, name)``: a reason to answer
    ``FORBIDDEN`` for that chunk (one of a closed run the peer is not admitted to), or None.
    """
    slots = ServeSlots(ServeLimits(max_concurrent, max_per_peer, max_per_prefix))

    async def handler(stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        peer = peer_id.to_bytes()
        try:
            detail = refusal(refuse, peer_id)
            if detail is not None:
                await _reject(stream, RejectCode.FORBIDDEN, detail)
                return
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    msg = await read_message(stream, DATASET, MAX_REQUEST)
                name, held = chunk_to_serve(msg, source)
            except ProtocolViolation as exc:
                log.info("rejecting chunk request from %s: %s", peer_id, exc)
                if on_violation is not None and exc.code not in NOT_A_FAULT:
                    on_violation(peer_id, exc.code)
                await _reject(stream, exc.code, exc.detail)
                return
            reason = refuse_chunk(peer_id, name) if refuse_chunk is not None else None
            if reason is not None:
                await _reject(stream, RejectCode.FORBIDDEN, reason)
                return
            prefix = _network_of(stream)
            try:
                slots.take(peer, prefix)
            except ProtocolViolation as exc:
                await _reject(stream, exc.code, exc.detail)
                return
            try:
                if isinstance(held, bytes):
                    await _send_bytes(stream, name, held, min_rate, grace)
                else:
                    await _send_file(stream, name, held, min_rate, grace)
            finally:
                slots.give_back(peer, prefix)
        except (PeerUnavailable, trio.TooSlowError):
            pass
        except ProtocolViolation as exc:
            # Our own file went missing or is unusable: the requester asks another holder.
            log.warning("cannot serve a chunk to %s: %s", peer_id, exc)
            await _reject(stream, exc.code, exc.detail)
        except Exception:
            log.exception("serving a chunk to %s failed", peer_id)
            await _reject(stream, RejectCode.INTERNAL, "")
        finally:
            await close_quietly(stream)

    return handler


async def _reject(stream: INetStream, code: RejectCode, detail: str) -> None:
    with trio.move_on_after(1.0), contextlib.suppress(Exception):
        await write_message(stream, Reject(code=int(code), detail=detail[:512]))


def _network_of(stream: INetStream) -> str | None:
    """The network prefix of the peer's address; None when relayed (the address is the
    relay's) or unknown."""
    if not is_direct_connection(getattr(stream, "muxed_conn", None)):
        return None
    ip = remote_ip(stream)
    return public_network_of(ip) if ip else None


async def _send_bytes(
    stream: INetStream, name: str, data: bytes, min_rate: float, grace: float
) -> None:
    if not 0 < len(data) <= MAX_CHUNK_BYTES:
        raise ProtocolViolation(RejectCode.INTERNAL, "held bytes have an impossible size")
    with trio.fail_after(transfer_deadline(len(data), min_rate=min_rate, grace=grace)):
        with trio.fail_after(PART_TIMEOUT):
            await write_message(stream, ChunkHeader(chunk=name, size=len(data)))
        for start in range(0, len(data), PART_BYTES):
            with trio.fail_after(PART_TIMEOUT):
                await write_message(stream, ChunkPart(data=data[start:start + PART_BYTES]))


async def _send_file(
    stream: INetStream, name: str, path: Path, min_rate: float, grace: float
) -> None:
    try:
        f = await trio.open_file(path, "rb")
    except OSError:
        raise ProtocolViolation(RejectCode.NOT_FOUND, f"chunk {name} is not here") from None
    async with f:
        size = (await trio.Path(path).stat()).st_size
        if not 0 < size <= MAX_CHUNK_BYTES:
            raise ProtocolViolation(RejectCode.INTERNAL, "chunk file has an impossible size")
        with trio.fail_after(transfer_deadline(size, min_rate=min_rate, grace=grace)):
            with trio.fail_after(PART_TIMEOUT):
                await write_message(stream, ChunkHeader(chunk=name, size=size))
            sent = 0
            while sent < size:
                data = await f.read(min(PART_BYTES, size - sent))
                if not data:
                    raise PeerUnavailable("chunk file shrank while being sent")
                with trio.fail_after(PART_TIMEOUT):
                    await write_message(stream, ChunkPart(data=data))
                sent += len(data)


async def fetch_chunk(
    host: IHost, peer_id: ID, name: str, *, expected_size: int | None = None,
    min_rate: float = MIN_RATE, grace: float = DEADLINE_GRACE,
) -> bytes:
    """Fetch chunk ``name`` from ``peer_id`` and return its verified bytes.

    The whole transfer must end within ``transfer_deadline(size)``, and every part but the
    last carry at least ``MIN_PART_BYTES``.

    Raises:
        PeerUnavailable: no stream, or the peer stalled, was too slow or closed early.
        RemoteRejected: the peer refused (e.g. ``NOT_FOUND``).
        ProtocolViolation: the peer sent malformed frames, too many bytes, or bytes whose
            hash is not ``name`` (the caller should score it and try another holder);
            ``LargerThanExpected`` when it announced more than ``expected_size``.

    Cancellation closes the stream.
    """
    receiver = ChunkReceiver(name, expected_size)
    stream: INetStream | None = None
    try:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                stream = await host.new_stream(peer_id, [TProtocol(CHUNK_PROTOCOL)])
                await write_message(stream, GetChunk(chunk=name))
                header = await read_message(stream, DATASET, MAX_REPLY)
        except trio.TooSlowError:
            raise PeerUnavailable(f"{peer_id} did not answer for chunk {name[:12]}") from None
        except (PeerUnavailable, ProtocolViolation):
            raise
        except Exception as exc:
            raise PeerUnavailable(f"cannot fetch from {peer_id}: {exc}") from None
        size = receiver.receive_header(header)
        deadline = trio.current_time() + transfer_deadline(size, min_rate=min_rate, grace=grace)
        while not receiver.complete:
            try:
                with trio.fail_at(min(deadline, trio.current_time() + PART_TIMEOUT)):
                    part = await read_message(stream, DATASET, MAX_PART_FRAME)
            except trio.TooSlowError:
                raise PeerUnavailable(
                    f"{peer_id} stalled or was too slow sending chunk {name[:12]}"
                ) from None
            receiver.receive_part(part)
        return receiver.result()
    finally:
        if stream is not None:
            await close_quietly(stream)
