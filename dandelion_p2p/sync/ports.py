"""What the sync side takes from the swarm node: narrow interfaces, not the ``SwarmNode``.

The node satisfies them; tests can hand in small fakes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from dandelion_p2p.reputation.book import ScoreEvent

if TYPE_CHECKING:
    from libp2p.abc import IHost
    from libp2p.peer.id import ID


class StatePeers(Protocol):
    """The peers that may hold a run's state, and a way to reach them: state transfer and
    the swarm's checkpoint step ask them over the node's host."""

    @property
    def host(self) -> IHost: ...

    @property
    def peer_id(self) -> ID:
        """This node's own id, never asked."""
        ...

    async def connect_peer(self, peer_id: ID) -> None:
        """Connect unless already connected.

        Raises:
            PeerUnavailable: no address of the peer is known, or none could be dialled.
        """
        ...

    async def members(self) -> Mapping[str, object]:
        """The swarm's members by base58 peer id, from the DHT.

        Raises:
            DandelionError: the DHT could not be read.
        """
        ...


class PeerScores(Protocol):
    """The node's score book, as a server that scores and refuses peers sees it."""

    def record_score(self, peer: bytes, event: ScoreEvent) -> None: ...

    def is_banned(self, peer_id: ID) -> bool: ...
