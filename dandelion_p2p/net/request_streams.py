"""Request streams kept open for the next request to the same peer.

Opening a libp2p stream (yamux frames each way, the protocol's negotiation, the closing
frames) costs several times the CPU of one exchange on a stream already open: 2.8 against
0.6 ms on loopback, requester and responder together. Every averaging round puts an
announcement on each server of the round's key and reads them again, so on a busy machine
that cost is paid between every two all-reduces. A protocol version that says so
(``/dandelion/dht/1.1.0``) carries exchanges in turn on one stream: the requester keeps the
stream after a reply and sends its next request to that peer on it, within ``REUSE_WITHIN``
seconds; the responder waits ``KEEP_ALIVE`` seconds for the next request
(``serve_requests(keep_alive=)``) before closing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.errors import PeerUnavailable
from dandelion_p2p.net.streams import (
    close_quietly,
    open_stream,
    read_message,
    unless_rejected,
    write_message,
)
from dandelion_p2p.wire import Message, Registry, Reject

REUSE_WITHIN = 5.0
"""Seconds a requester keeps an idle stream for its next request; half the responder's
``KEEP_ALIVE``, so that a stream is not reused just as the responder closes it."""
KEEP_ALIVE = 10.0
"""Seconds a responder waits on a kept stream for the next request."""
IDLE_PER_PEER = 4
IDLE_TOTAL = 256
SWEEPS_PER_REUSE = 5
"""``run`` closes the streams idle past ``REUSE_WITHIN`` this many times within it."""


@dataclass
class _Idle:
    stream: INetStream
    since: float


class RequestStreams:
    """One request/reply exchange per call, as ``net.streams.request``, on a stream kept
    from an earlier exchange with the peer when one is idle. Streams are offered
    ``protocols`` in order; only those that agreed on ``reusable`` are kept, at most
    ``per_peer`` idle ones per peer and ``total`` in all, and only after a reply that is not
    a ``Reject`` (the responder closes the stream after one); ``run`` closes them once they
    are too old to be reused."""

    def __init__(
        self,
        host: IHost,
        protocols: Sequence[str],
        *,
        reusable: str,
        reuse_within: float = REUSE_WITHIN,
        per_peer: int = IDLE_PER_PEER,
        total: int = IDLE_TOTAL,
    ) -> None:
        self.host = host
        self.protocols = [TProtocol(p) for p in protocols]
        self.reusable = reusable
        self.reuse_within = reuse_within
        self.per_peer = per_peer
        self.total = total
        self._idle: dict[ID, list[_Idle]] = {}
        self.reused = 0
        """Exchanges made on a kept stream (for tests and benchmarks)."""

    @property
    def idle(self) -> int:
        return sum(len(kept) for kept in self._idle.values())

    async def request(
        self, peer_id: ID, msg: Message, registry: Registry, *, max_reply: int, timeout: float
    ) -> Message:
        """Send ``msg`` to ``peer_id`` and return its reply, within ``timeout``.

        A kept stream that fails before a reply came (the responder closed it, or its
        connection went) is given up and the request sent again on a fresh stream, within
        the same ``timeout``: every request of the protocols kept this way can be sent twice.

        Raises:
            PeerUnavailable: no stream could be opened, or no complete reply in time.
            ProtocolViolation: the reply was malformed (the caller scores the peer).
            RemoteRejected: the peer answered with a ``Reject``.
        """
        try:
            with trio.fail_after(timeout):
                kept = self._take(peer_id)
                if kept is not None:
                    with contextlib.suppress(PeerUnavailable):
                        reply = await self._exchange(kept.stream, msg, registry, max_reply)
                        self.reused += 1
                        return self._answered(peer_id, kept.stream, reply)
                stream = await open_stream(self.host, peer_id, self.protocols)
                reply = await self._exchange(stream, msg, registry, max_reply)
                return self._answered(peer_id, stream, reply)
        except trio.TooSlowError:
            raise PeerUnavailable(
                f"{self.protocols[0]} to {peer_id} timed out after {timeout} s") from None

    async def _exchange(
        self, stream: INetStream, msg: Message, registry: Registry, max_reply: int
    ) -> Message:
        """Write the request and read the reply; on any failure or cancellation the stream
        is closed (what is left on it is unknown)."""
        try:
            await write_message(stream, msg)
            return await read_message(stream, registry, max_reply)
        except BaseException:
            await close_quietly(stream, reset=True)
            raise

    def _answered(self, peer_id: ID, stream: INetStream, reply: Message) -> Message:
        if isinstance(reply, Reject):
            self._discard(stream)
        else:
            self._keep(peer_id, stream)
        return unless_rejected(reply)

    def _take(self, peer_id: ID) -> _Idle | None:
        """The most recently used idle stream to the peer that may still be open."""
        kept = self._idle.get(peer_id)
        now = trio.current_time()
        while kept:
            idle = kept.pop()
            if self._fresh(idle, now) and self._on_the_only_connection(peer_id, idle.stream):
                if not kept:
                    del self._idle[peer_id]
                return idle
            self._discard(idle.stream)
        self._idle.pop(peer_id, None)
        return None

    def _fresh(self, idle: _Idle, now: float) -> bool:
        return now - idle.since < self.reuse_within and _looks_open(idle.stream)

    def _on_the_only_connection(self, peer_id: ID, stream: INetStream) -> bool:
        """With two connections to the peer, the older is being replaced (``net.upgrade``):
        a fresh stream then takes the one the swarm keeps, and the old one can close."""
        network: Any = self.host.get_network()
        connections = network.get_connections(peer_id)
        return len(connections) == 1 and connections[0].muxed_conn is stream.muxed_conn

    def _keep(self, peer_id: ID, stream: INetStream) -> None:
        if stream.get_protocol() != self.reusable:
            self._discard(stream)
            return
        kept = self._idle.setdefault(peer_id, [])
        if len(kept) >= self.per_peer or self.idle >= self.total:
            if not kept:
                del self._idle[peer_id]
            self._discard(stream)
            return
        kept.append(_Idle(stream, trio.current_time()))

    async def run(self) -> None:
        """Runs forever: closes kept streams soon after ``reuse_within`` or once they ended,
        so that neither side holds them (nor a connection being replaced) for longer."""
        while True:
            await trio.sleep(self.reuse_within / SWEEPS_PER_REUSE)
            self._expire(trio.current_time())

    def _expire(self, now: float) -> None:
        """Close the streams idle past ``reuse_within`` (the responder is about to) and
        those that ended."""
        for peer_id, kept in list(self._idle.items()):
            fresh = [i for i in kept if self._fresh(i, now)]
            for idle in kept:
                if idle not in fresh:
                    self._discard(idle.stream)
            if fresh:
                self._idle[peer_id] = fresh
            else:
                del self._idle[peer_id]

    def _discard(self, stream: INetStream) -> None:
        """Close ``stream`` without waiting for it (the caller is answering a request)."""
        # RuntimeError: the run is ending, and its connections with it.
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.spawn_system_task(close_quietly, stream)


def _looks_open(stream: INetStream) -> bool:
    """False when the stream is known to have ended (a kept stream's responder closed it,
    or its connection is gone) or holds bytes nobody asked for (a frame after the reply,
    which the next request would take for its own); True otherwise, including when it
    cannot tell."""
    if getattr(stream, "is_closed", False) is True:
        return False
    muxed = getattr(stream, "muxed_stream", None)
    if any(getattr(muxed, flag, False) is True
           for flag in ("closed", "recv_closed", "reset_received")):
        return False
    # py-libp2p's yamux buffers what arrived for a stream on its connection.
    buffers = getattr(getattr(muxed, "conn", None), "stream_buffers", None)
    return not (isinstance(buffers, dict) and buffers.get(getattr(muxed, "stream_id", None)))
