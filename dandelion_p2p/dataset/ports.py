"""What the dataset client and server take from the node: narrow interfaces, not the
``SwarmNode``.

The swarm node satisfies these structurally, as its DHT (``SwarmNode.records``) satisfies
the record store and its identity the signer; those two are the network layer's own
(``net.ports``), re-exported here so a caller finds every port of the dataset role in one
place. Streams run over the node's libp2p host (``IHost``). Tests can hand in small fakes.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import TYPE_CHECKING, Protocol

from dandelion_p2p.net.ports import Connector, RecordStore, Signer
from dandelion_p2p.reputation.book import ScoreEvent

if TYPE_CHECKING:
    from libp2p.peer.id import ID

__all__ = ["PeerConnector", "PeerScores", "RecordStore", "Signer"]


class PeerConnector(Connector, Protocol):
    """Connects to dataset servers and chunk holders: at addresses the client was given,
    else at those the peer announced in the DHT."""

    async def connect_peer(self, peer_id: ID, addrs: Sequence[str] = ()) -> None:
        """Connect unless already connected: at ``addrs`` when given, else at the addresses
        found in the DHT.

        Raises:
            PeerUnavailable: no address of the peer is known, or none could be dialled.
        """
        ...


class PeerScores(Protocol):
    """The node's standing of other peers, as a dataset server or client scores, counts and
    refuses them."""

    @property
    def violations(self) -> MutableMapping[str, int]:
        """Protocol violations per base58 peer id, counted by every feature (node status)."""
        ...

    def record_score(self, peer: bytes, event: ScoreEvent) -> None: ...

    def is_banned(self, peer_id: ID) -> bool: ...
