"""Chunk transfer over libp2p: serve chunks by hash, fetch and verify them.

The server answers ``GetChunk`` with a ``ChunkHeader`` and the bytes in ``ChunkPart`` frames
of at most 1 MiB; the fetcher bounds every frame before decoding it, refuses more bytes than
announced (or than the lease said), and checks the blake3 hash over everything it got, so a
truncated, padded or altered chunk never passes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import blake3
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.dataset.chunks import MAX_CHUNK_BYTES, check_chunk_name
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
from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation, RemoteRejected
from dandelion_p2p.net.streams import (
    NOT_A_FAULT,
    ViolationSink,
    close_quietly,
    read_message,
    write_message,
)
from dandelion_p2p.wire import Reject, RejectCode

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0
PART_TIMEOUT = 30.0
"""Seconds one part may take to arrive or to be sent: a stalled peer is dropped."""
MIN_RATE = 256 * 1024
"""Bytes per second a whole transfer must average, on top of ``DEADLINE_GRACE``: a peer
trickling a byte just inside ``PART_TIMEOUT`` would otherwise hold a fetch or a serve slot
for days."""
DEADLINE_GRACE = 30.0
MIN_PART_BYTES = 64 * 1024
"""Every part but the last carries at least this much (senders use ``PART_BYTES``)."""
MAX_CONCURRENT_SERVES = 8
MAX_SERVES_PER_PEER = 2


class LargerThanExpected(ProtocolViolation):
    """The holder announced more bytes than the fetcher expected: a violation only when the
    expectation came from the signed manifest, not from a caller that may be wrong."""


def transfer_deadline(size: int, *, min_rate: float = MIN_RATE,
                      grace: float = DEADLINE_GRACE) -> float:
    """Seconds a transfer of ``size`` bytes may take in all."""
    return size / min_rate + grace

ChunkSource = Callable[[str], Path | bytes | None]
"""A chunk's file, or bytes held in memory (the signed manifest), or None when not held."""


def serve_chunks(
    source: ChunkSource,
    *,
    on_violation: ViolationSink | None = None,
    refuse: Callable[[ID], bool] | None = None,
    max_concurrent: int = MAX_CONCURRENT_SERVES,
    max_per_peer: int = MAX_SERVES_PER_PEER,
    min_rate: float = MIN_RATE,
    grace: float = DEADLINE_GRACE,
) -> Callable[[INetStream], Awaitable[None]]:
    """A stream handler for ``CHUNK_PROTOCOL``: one chunk per stream, read from ``source``.

    ``source(name)`` maps a valid chunk name to its file, or None when it is not held. Bad
    requests are answered with a ``Reject`` and reported; none of them stops the handler.
    At most ``max_concurrent`` chunks are sent at once, ``max_per_peer`` to one peer, each
    within ``transfer_deadline`` (a slow reader is cut off and its slot freed).
    """
    slots = trio.Semaphore(max_concurrent)
    per_peer: dict[ID, int] = {}

    async def reject(stream: INetStream, code: RejectCode, detail: str) -> None:
        with trio.move_on_after(1.0), contextlib.suppress(Exception):
            await write_message(stream, Reject(code=int(code), detail=detail[:512]))

    async def handler(stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        try:
            if refuse is not None and refuse(peer_id):
                await reject(stream, RejectCode.FORBIDDEN, "banned")
                return
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    msg = await read_message(stream, DATASET, MAX_REQUEST)
                if not isinstance(msg, GetChunk):
                    raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "expected GetChunk")
                name = check_chunk_name(msg.chunk)
                path = source(name)
                if path is None:
                    raise ProtocolViolation(RejectCode.NOT_FOUND, f"chunk {name} is not here")
            except ProtocolViolation as exc:
                log.info("rejecting chunk request from %s: %s", peer_id, exc)
                if on_violation is not None and exc.code not in NOT_A_FAULT:
                    on_violation(peer_id, exc.code)
                await reject(stream, exc.code, exc.detail)
                return
            if per_peer.get(peer_id, 0) >= max_per_peer:
                await reject(stream, RejectCode.RATE_LIMITED,
                             f"already sending you {max_per_peer} chunks")
                return
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                await reject(stream, RejectCode.RATE_LIMITED, "serving too many chunks")
                return
            per_peer[peer_id] = per_peer.get(peer_id, 0) + 1
            try:
                if isinstance(path, bytes):
                    await _send_bytes(stream, name, path, min_rate, grace)
                else:
                    await _send_file(stream, name, path, min_rate, grace)
            finally:
                slots.release()
                left = per_peer.pop(peer_id) - 1
                if left:
                    per_peer[peer_id] = left
        except (PeerUnavailable, trio.TooSlowError):
            pass
        except ProtocolViolation as exc:
            # Our own file went missing or is unusable: the requester asks another holder.
            log.warning("cannot serve a chunk to %s: %s", peer_id, exc)
            await reject(stream, exc.code, exc.detail)
        except Exception:
            log.exception("serving a chunk to %s failed", peer_id)
            await reject(stream, RejectCode.INTERNAL, "")
        finally:
            await close_quietly(stream)

    return handler


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
            hash is not ``name`` (the caller should score it and try another holder).

    Cancellation closes the stream.
    """
    check_chunk_name(name)
    limit = expected_size if expected_size is not None else MAX_CHUNK_BYTES
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
        if isinstance(header, Reject):
            raise RemoteRejected(header.code, header.detail)
        if not isinstance(header, ChunkHeader) or header.chunk != name:
            raise ProtocolViolation(RejectCode.UNEXPECTED, "expected the header of that chunk")
        if header.size > limit:
            raise LargerThanExpected(
                RejectCode.TOO_LARGE, f"chunk of {header.size} bytes, expected at most {limit}"
            )
        hasher = blake3.blake3()
        received = bytearray()
        deadline = trio.current_time() + transfer_deadline(
            header.size, min_rate=min_rate, grace=grace
        )
        while len(received) < header.size:
            try:
                with trio.fail_at(min(deadline, trio.current_time() + PART_TIMEOUT)):
                    part = await read_message(stream, DATASET, MAX_PART_FRAME)
            except trio.TooSlowError:
                raise PeerUnavailable(
                    f"{peer_id} stalled or was too slow sending chunk {name[:12]}"
                ) from None
            if not isinstance(part, ChunkPart):
                raise ProtocolViolation(RejectCode.UNEXPECTED, "expected a ChunkPart")
            if len(received) + len(part.data) > header.size:
                raise ProtocolViolation(RejectCode.TOO_LARGE, "more bytes than announced")
            if len(part.data) < MIN_PART_BYTES and len(received) + len(part.data) < header.size:
                raise ProtocolViolation(
                    RejectCode.INVALID_FIELD,
                    f"a part of {len(part.data)} bytes (at least {MIN_PART_BYTES} but the last)",
                )
            hasher.update(part.data)
            received += part.data
        if hasher.hexdigest() != name:
            raise ProtocolViolation(
                RejectCode.INVALID_FIELD, f"chunk bytes do not hash to {name[:12]}..."
            )
        return bytes(received)
    finally:
        if stream is not None:
            await close_quietly(stream)
