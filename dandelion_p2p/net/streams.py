"""Framed messages over libp2p streams: the thin async layer around the sans-IO wire format."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID

from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation, RemoteRejected
from dandelion_p2p.net.origin import remote_ip
from dandelion_p2p.networks import network_of
from dandelion_p2p.wire import Message, Registry, Reject, RejectCode, decode, encode
from dandelion_p2p.wire.frame_budget import PROCESS_FRAME_BUDGET, FrameBudget
from dandelion_p2p.wire.framing import HEADER, HEADER_SIZE, check_length

log = logging.getLogger(__name__)

# Violations are reported here (peer id, code) so a score book can count them.
ViolationSink = Callable[[ID, RejectCode], None]

# Rejections an honest peer can earn (a lost race, a full store): answered, never scored.
NOT_A_FAULT = frozenset({RejectCode.STALE, RejectCode.RATE_LIMITED, RejectCode.NOT_FOUND})


async def read_exact(stream: INetStream, n: int) -> bytes:
    """Read exactly ``n`` bytes. EOF, reset or close first raises ``PeerUnavailable``."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except StreamError as exc:  # EOF, reset and closed are all StreamError subclasses
            raise PeerUnavailable(
                f"stream ended after {len(buf)} of {n} bytes: {type(exc).__name__}"
            ) from None
        if not chunk:
            raise PeerUnavailable(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class FrameBudgetExceeded(ProtocolViolation):
    """Partly received frames went over a bound. ``peer_at_fault`` when the bound was the
    peer's own share (score it); otherwise its network or the whole process was full."""

    def __init__(self, detail: str, *, peer_at_fault: bool) -> None:
        code = RejectCode.TOO_LARGE if peer_at_fault else RejectCode.RATE_LIMITED
        super().__init__(code, detail)
        self.peer_at_fault = peer_at_fault


# A body is read and charged in pieces of at most this size, never at its declared length.
BODY_READ_CHUNK = 64 * 1024


def stream_origin(stream: INetStream) -> tuple[bytes, str]:
    """The remote peer's id bytes and the network (/24 or /48) it connects from."""
    try:
        peer = stream.muxed_conn.peer_id.to_bytes()
    except Exception:  # a stream without a connection (a test double) is one unknown peer
        peer = b""
    return peer, network_of(remote_ip(stream))


async def read_frame(
    stream: INetStream, max_size: int, budget: FrameBudget | None = None,
    header: bytes | None = None,
) -> bytes:
    """Read one frame, charging its body to ``budget`` as the bytes arrive (its length
    prefix, ``header``, when the caller read it already).

    Raises ``ProtocolViolation(RATE_LIMITED)`` when the peer, its network or the process would
    go over the budget for partly received frames; the caller resets the stream. The charge is
    released when this returns or raises, whatever the reason.
    """
    budget = budget if budget is not None else PROCESS_FRAME_BUDGET
    if header is None:
        header = await read_exact(stream, HEADER_SIZE)
    (length,) = HEADER.unpack(header)
    check_length(length, max_size)
    peer, network = stream_origin(stream)
    body = bytearray()
    charged = 0
    try:
        while len(body) < length:
            try:
                chunk = await stream.read(min(BODY_READ_CHUNK, length - len(body)))
            except StreamError as exc:
                raise PeerUnavailable(
                    f"stream ended after {len(body)} of {length} bytes: {type(exc).__name__}"
                ) from None
            if not chunk:
                raise PeerUnavailable(f"stream ended after {len(body)} of {length} bytes")
            if not budget.try_charge(peer, network, len(chunk)):
                held = budget.held_by(peer)
                raise FrameBudgetExceeded(
                    f"partly received frames over budget ({held} bytes held by this peer,"
                    f" {budget.held_by_network(network)} by {network}, {budget.used} in all)",
                    peer_at_fault=held + len(chunk) > budget.limits.per_peer_bytes,
                )
            charged += len(chunk)
            body += chunk
        return bytes(body)
    finally:
        budget.release(peer, network, charged)


async def read_message(
    stream: INetStream, registry: Registry, max_size: int, header: bytes | None = None
) -> Message:
    return decode(await read_frame(stream, max_size, header=header), registry)


async def write_message(stream: INetStream, msg: Message) -> None:
    payload = encode(msg)
    try:
        await stream.write(HEADER.pack(len(payload)) + payload)
    except StreamError as exc:
        raise PeerUnavailable(f"write failed: {type(exc).__name__}") from None


async def close_quietly(stream: INetStream, *, reset: bool = False) -> None:
    with trio.move_on_after(1.0) as scope:
        scope.shield = True
        # The peer may already be gone; then there is nothing left to close.
        with contextlib.suppress(Exception):
            if reset:
                await stream.reset()
            else:
                await stream.close()


async def open_stream(host: IHost, peer_id: ID, protocols: list[TProtocol]) -> INetStream:
    """A fresh stream to ``peer_id`` speaking the first of ``protocols`` it accepts.

    Raises:
        PeerUnavailable: no stream could be opened.
    """
    try:
        return await host.new_stream(peer_id, protocols)
    except Exception as exc:
        raise PeerUnavailable(f"cannot open {protocols[0]} to {peer_id}: {exc}") from None


def unless_rejected(reply: Message) -> Message:
    """``reply``, or ``RemoteRejected`` when it is a ``Reject``."""
    if isinstance(reply, Reject):
        raise RemoteRejected(reply.code, reply.detail)
    return reply


async def request(
    host: IHost,
    peer_id: ID,
    protocol: str,
    msg: Message,
    registry: Registry,
    *,
    max_reply: int,
    timeout: float,
) -> Message:
    """One request/response exchange on a fresh stream.

    Raises:
        PeerUnavailable: no stream could be opened, or no complete reply came within ``timeout``.
        ProtocolViolation: the reply was malformed (the caller should score the peer).
        RemoteRejected: the peer answered with a ``Reject``.

    Cancellation closes the stream; nothing else is left behind.
    """
    stream: INetStream | None = None
    try:
        with trio.fail_after(timeout):
            stream = await open_stream(host, peer_id, [TProtocol(protocol)])
            await write_message(stream, msg)
            reply = await read_message(stream, registry, max_reply)
    except trio.TooSlowError:
        raise PeerUnavailable(f"{protocol} to {peer_id} timed out after {timeout} s") from None
    finally:
        if stream is not None:
            await close_quietly(stream)
    return unless_rejected(reply)


Refuse = Callable[[ID], bool | str]
"""Whether a peer is answered ``FORBIDDEN`` before its request is read: True (a banned peer)
or a reason; False to serve it."""


def refusal(refuse: Refuse | None, peer_id: ID) -> str | None:
    """The detail of the ``FORBIDDEN`` that ``refuse`` gives ``peer_id`` ("banned" or its
    reason), or None when it is served."""
    refused = refuse(peer_id) if refuse is not None else False
    if not refused:
        return None
    return refused if isinstance(refused, str) else "banned"


def serve_requests(
    registry: Registry,
    handle: Callable[[ID, Message], Awaitable[Message]],
    *,
    max_request: int,
    timeout: float,
    on_violation: ViolationSink | None = None,
    refuse: Refuse | None = None,
    keep_alive: float = 0.0,
) -> Callable[[INetStream], Awaitable[None]]:
    """A stream handler that answers framed requests: one per stream, or with ``keep_alive``
    one after another (``net.request_streams``). Each request, from its length prefix on, is
    read, handled and answered within ``timeout``; the next one's length prefix is awaited
    ``keep_alive`` seconds, holding nothing of the budget for partly received frames.

    A protocol violation is answered with a ``Reject`` carrying its code, reported to
    ``on_violation``, and the stream is closed; an error in ``handle`` is answered with
    ``INTERNAL`` and logged. Neither reaches the host: one bad peer never stops the service.
    A peer for which ``refuse`` returns True (a banned peer) or a reason gets ``FORBIDDEN``
    unread, with "banned" or the reason as its detail.
    """

    async def answer_one(stream: INetStream, peer_id: ID, header: bytes | None) -> bool | None:
        """Read (after ``header``, when already read), handle and answer one request. True:
        the stream may carry another; False: close it; None: reset it."""
        detail = refusal(refuse, peer_id)
        if detail is not None:
            with trio.move_on_after(1.0), contextlib.suppress(Exception):
                await write_message(stream, Reject(code=int(RejectCode.FORBIDDEN), detail=detail))
            return False
        try:
            with trio.fail_after(timeout):
                try:
                    msg = await read_message(stream, registry, max_request, header=header)
                    reply = await handle(peer_id, msg)
                except FrameBudgetExceeded as exc:
                    # Reset, not answered: the memory goes back at once and the sender learns
                    # nothing it could tune a slower attack by.
                    log.info("resetting %s stream from %s: %s", registry.family, peer_id, exc)
                    if on_violation is not None and exc.peer_at_fault:
                        on_violation(peer_id, exc.code)
                    return None
                except ProtocolViolation as exc:
                    log.info("rejecting %s from %s: %s", registry.family, peer_id, exc)
                    if on_violation is not None and exc.code not in NOT_A_FAULT:
                        on_violation(peer_id, exc.code)
                    reply = Reject(code=int(exc.code), detail=exc.detail[:512])
                await write_message(stream, reply)
                return not isinstance(reply, Reject)
        except (PeerUnavailable, trio.TooSlowError):
            return False
        except Exception:
            log.exception("%s handler failed for %s", registry.family, peer_id)
            with trio.move_on_after(1.0):
                with contextlib.suppress(Exception):
                    await write_message(stream, Reject(code=int(RejectCode.INTERNAL)))
            return False

    async def next_header(stream: INetStream) -> bytes | None:
        """The next request's length prefix; None when the requester closed its side or
        sent none within ``keep_alive``."""
        with trio.move_on_after(keep_alive), contextlib.suppress(PeerUnavailable):
            return await read_exact(stream, HEADER_SIZE)
        return None

    async def handler(stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        outcome: bool | None = False
        try:
            outcome = await answer_one(stream, peer_id, None)
            while outcome and keep_alive > 0:
                header = await next_header(stream)
                if header is None:
                    break
                outcome = await answer_one(stream, peer_id, header)
        finally:
            await close_quietly(stream, reset=outcome is None)

    return handler
