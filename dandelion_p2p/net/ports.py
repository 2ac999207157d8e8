"""The narrow interfaces features take from the network layer instead of the swarm node.

A feature that stores records, signs, or connects to peers names only what it uses: the DHT
node, an ``Identity`` and the swarm node satisfy these, and tests hand in small fakes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from dandelion_p2p.net.dht.messages import SignedRecord

if TYPE_CHECKING:
    import trio
    from libp2p.peer.id import ID


class RecordStore(Protocol):
    """Signed records in the DHT, by (namespace, key); the node's own key signs what it puts."""

    async def put(
        self,
        namespace: str,
        key: bytes,
        value: bytes,
        ttl: float,
        *,
        keep: bool = True,
        timeout: float | None = None,
    ) -> int:
        """Sign ``value`` and store it on the servers closest to the key; returns how many
        stored it (0 is not an error). With ``keep`` the record is republished before it
        expires until ``unpublish``. ``timeout`` bounds the lookup and, again, the stores
        (servers found by ``prepare_put`` take the lookup's place).

        Raises:
            ProtocolViolation: the value is too large for a record.
        """
        ...

    async def get(
        self, namespace: str, key: bytes, *, timeout: float | None = None
    ) -> list[SignedRecord]:
        """Every valid, unexpired record under (namespace, key), the newest per publisher.

        Raises:
            DandelionError: the DHT could not be read.
        """
        ...

    def held(self, namespace: str, key: bytes) -> list[SignedRecord] | None:
        """The records under (namespace, key) that this node stores as one of the key's
        closest servers, read without asking anyone; None when it is not one of them (a
        client, or a server with closer ones known).
        """
        ...

    def landing(self, namespace: str, key: bytes) -> trio.Event:
        """Set when the next record under (namespace, key) is stored in this node's own store
        (from anyone, this node included): a reader of ``held`` waits on it instead of
        polling. Taken with no checkpoint between it and a read of ``held``, it is set by
        any record stored after that read. It may also be set early (too many keys waited
        on at once): read again.
        """
        ...

    async def prepare_put(
        self, namespace: str, key: bytes, *, timeout: float | None = None
    ) -> None:
        """Find the servers closest to the key now, so that a put under it soon after (within
        a minute) stores there at once instead of looking them up first.

        Raises:
            DandelionError: the DHT could not be asked.
        """
        ...

    def unpublish(self, namespace: str, key: bytes) -> None:
        """Stop republishing the record put under (namespace, key); it expires on its own."""
        ...


class Signer(Protocol):
    """Signs as one peer (an ``Identity``)."""

    @property
    def peer_id_bytes(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


class Connector(Protocol):
    """Opens connections to peers by id, finding their addresses in the DHT when needed."""

    async def connect_peer(self, peer_id: ID) -> None:
        """Connect unless already connected.

        Raises:
            PeerUnavailable: no address of the peer is known, or none could be dialled.
        """
        ...

    def is_connected(self, peer_id: ID) -> bool: ...
