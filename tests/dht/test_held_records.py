"""A server among a key's closest reads what it holds under the key from its own store
(``DHTNode.held``: the round announcements a matchmaker polls), on real nodes over loopback;
a server with closer ones known, and a client, hold nothing to read that way."""

from __future__ import annotations

from dandelion_p2p.net.dht.node import DHTNode
from dandelion_p2p.net.dht.records import NamespacePolicy, routing_key
from dandelion_p2p.net.dht.routing import distance
from tests.swarm import swarm

NAMESPACE = "test-held"


def dht(node: object) -> DHTNode:
    found = getattr(node, "dht", None)
    assert isinstance(found, DHTNode)
    return found


async def test_a_server_of_the_key_reads_the_puts_that_landed_in_its_store() -> None:
    async with swarm(5) as nodes:
        for n in nodes:
            n.validator.register(NAMESPACE, NamespacePolicy(max_ttl_ms=600_000))
        writers = [dht(n) for n in nodes[:3]]
        for i, writer in enumerate(writers):
            assert await writer.put(NAMESPACE, b"k", b"v%d" % i, 60, keep=False,
                                    timeout=5.0) == 5
        # Five servers, within the replication factor: every one of them holds all three.
        for n in nodes:
            held = dht(n).held(NAMESPACE, b"k")
            assert held is not None
            assert sorted(r.value for r in held) == [b"v0", b"v1", b"v2"]
        assert dht(nodes[4]).held(NAMESPACE, b"another key") == []


async def test_a_server_with_closer_ones_known_or_a_client_holds_nothing_to_read() -> None:
    async with swarm(5) as nodes:
        reader = dht(nodes[0])
        # A key that four servers are closer to than the reader.
        key = next(k for k in (b"k%d" % i for i in range(10_000)) if all(
            distance(c.key, routing_key(NAMESPACE, k))
            < distance(reader.table.local_key, routing_key(NAMESPACE, k))
            for c in reader.table.contacts()))
        assert reader.held(NAMESPACE, key) == []
        reader.replicas = 2
        assert reader.held(NAMESPACE, key) is None
        reader.replicas = 8
        reader.server = False
        assert reader.held(NAMESPACE, key) is None
