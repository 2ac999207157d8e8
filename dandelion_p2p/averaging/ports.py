"""What the averager takes from the node: narrow interfaces, not the ``SwarmNode``.

The swarm node, its identity, its DHT (``SwarmNode.records``) and the data plane satisfy
these structurally; the record store, the signer and the connector are the network layer's
own (``net.ports``), re-exported here so a caller finds every port of the averager in one
place. Tests can hand in small fakes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from dandelion_p2p.net.ports import Connector, RecordStore, Signer
from dandelion_p2p.reputation.book import ScoreBook, ScoreEvent

if TYPE_CHECKING:
    from libp2p.peer.id import ID

    from dandelion_p2p.dataplane.channel import Channel

__all__ = [
    "ChannelHandler",
    "ChannelOpener",
    "Connector",
    "PeerLinks",
    "PeerReputation",
    "RecordStore",
    "Signer",
]

ChannelHandler = Callable[["Channel"], Awaitable[None]]


class PeerLinks(Connector, Protocol):
    """How this node reaches the other members, and whether they can reach it."""

    @property
    def reachable(self) -> bool:
        """Whether others can dial this node directly; only such peers reduce a span,
        unless no member can be dialled."""
        ...


class PeerReputation(Protocol):
    """The node's standing of other peers: the bans it holds, and what a round reports."""

    @property
    def scores(self) -> ScoreBook:
        """The score book, read for this node's bans (never written through this)."""
        ...

    def record_score(self, peer: bytes, event: ScoreEvent) -> None:
        """Record what ``peer`` did in a round."""
        ...

    def record_link_rate(self, peer: bytes, nbytes: int, seconds: float) -> None:
        """``nbytes`` received from ``peer`` in ``seconds``, for the node's link status."""
        ...


class ChannelOpener(Protocol):
    """The data plane, as averaging uses it: one purpose's channels to and from peers."""

    @property
    def endpoint(self) -> str | None:
        """``ip:port`` of the bound data-plane listener (None before it is bound)."""
        ...

    def register(self, purpose: str, handler: ChannelHandler) -> None:
        """Serve inbound channels for ``purpose`` with ``handler``.

        Raises:
            ValueError: a handler for ``purpose`` is already registered.
        """
        ...

    def unregister(self, purpose: str) -> None: ...

    async def open(self, peer_id: ID, purpose: str, *, timeout: float = ...) -> Channel:
        """Open a channel to ``peer_id`` (already connected) for ``purpose``.

        Raises:
            PeerUnavailable: no stream, or the handshake did not finish within ``timeout``.
            RemoteRejected: the peer refused.
            ProtocolViolation: the peer broke the handshake.
        """
        ...
