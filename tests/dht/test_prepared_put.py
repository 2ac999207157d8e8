"""A put whose key's closest servers were found ahead (``DHTNode.prepare_put``, used for the
next round's announcement) stores there without a lookup of its own, on real nodes over
loopback; servers that have gone since, or a set found too long ago, send it back to a
lookup, and a put while its key is being prepared waits for that instead of looking twice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht import node as dht_node
from dandelion_p2p.net.dht.messages import PeerRef
from dandelion_p2p.net.dht.node import DHTNode, now_ms
from dandelion_p2p.net.dht.records import NamespacePolicy, routing_key
from dandelion_p2p.net.node import SwarmNode
from tests.swarm import swarm

NAMESPACE, KEY = "test-prepared", b"round-7"


class CountingLookups:
    """Counts the writer's lookups (``find_closest``) while the real ones run."""

    def __init__(self, dht: DHTNode, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = dht.find_closest

        async def counted(target: bytes, count: int | None = None, *,
                          timeout: float | None = None) -> list[PeerRef]:
            self.calls += 1
            return await real(target, count, timeout=timeout)

        monkeypatch.setattr(dht, "find_closest", counted)


@asynccontextmanager
async def five_nodes() -> AsyncIterator[tuple[DHTNode, list[SwarmNode]]]:
    async with swarm(5) as nodes:
        for n in nodes:
            n.validator.register(NAMESPACE, NamespacePolicy(max_ttl_ms=600_000))
        writer = nodes[1].dht
        assert writer is not None
        yield writer, nodes


def holders(nodes: list[SwarmNode], value: bytes) -> int:
    target = routing_key(NAMESPACE, KEY)
    count = 0
    for n in nodes:
        assert n.dht is not None
        count += any(r.value == value for r in n.dht.store.get(target, now_ms()))
    return count


async def test_a_prepared_put_stores_without_a_lookup_of_its_own(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    async with five_nodes() as (writer, nodes):
        lookups = CountingLookups(writer, monkeypatch)
        await writer.prepare_put(NAMESPACE, KEY, timeout=5.0)
        assert lookups.calls == 1
        stored = await writer.put(NAMESPACE, KEY, b"v1", 60, keep=False, timeout=5.0)
        assert lookups.calls == 1, "the put looked the servers up again"
        # Itself and the four others: five servers, all within the replication factor.
        assert stored == 5 and holders(nodes, b"v1") == 5
        reader = nodes[3].dht
        assert reader is not None
        (got,) = await reader.get(NAMESPACE, KEY)
        assert got.value == b"v1"


async def test_a_put_looks_again_when_every_prepared_server_is_gone(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    async with five_nodes() as (writer, nodes):
        await writer.prepare_put(NAMESPACE, KEY, timeout=5.0)
        # The servers found then have all left since (no one listens where they were).
        gone = [PeerRef(peer_id=Identity.generate().peer_id_bytes,
                        addrs=("/ip4/127.0.0.1/tcp/9",)) for _ in range(3)]
        target = routing_key(NAMESPACE, KEY)
        found_at, _ = writer._prepared[target]
        writer._prepared[target] = (found_at, gone)
        lookups = CountingLookups(writer, monkeypatch)
        stored = await writer.put(NAMESPACE, KEY, b"v2", 60, keep=False, timeout=5.0)
        assert lookups.calls == 1
        assert stored == 5 and holders(nodes, b"v2") == 5
        assert target not in writer._prepared, "the gone servers would be tried again"


async def test_servers_found_too_long_ago_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    async with five_nodes() as (writer, nodes):
        await writer.prepare_put(NAMESPACE, KEY, timeout=5.0)
        monkeypatch.setattr(dht_node, "PREPARED_FRESH", 0.0)
        await trio.sleep(0.01)
        lookups = CountingLookups(writer, monkeypatch)
        assert await writer.put(NAMESPACE, KEY, b"v3", 60, keep=False, timeout=5.0) == 5
        assert lookups.calls == 1
        assert holders(nodes, b"v3") == 5


async def test_a_put_while_its_key_is_being_prepared_waits_for_it(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    async with five_nodes() as (writer, nodes):
        lookups = CountingLookups(writer, monkeypatch)
        stored: list[int] = []

        async def put() -> None:
            stored.append(await writer.put(NAMESPACE, KEY, b"v4", 60, keep=False, timeout=5.0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.prepare_put, NAMESPACE, KEY)
            await trio.sleep(0)
            nursery.start_soon(put)
        assert lookups.calls == 1
        assert stored == [5] and holders(nodes, b"v4") == 5


async def test_prepared_keys_are_bounded() -> None:
    async with five_nodes() as (writer, _nodes):
        for i in range(dht_node.PREPARED_KEYS + 5):
            await writer.prepare_put(NAMESPACE, b"round-%d" % i, timeout=5.0)
        assert len(writer._prepared) == dht_node.PREPARED_KEYS
        # The oldest went first.
        assert routing_key(NAMESPACE, b"round-0") not in writer._prepared
        last = dht_node.PREPARED_KEYS + 4
        assert routing_key(NAMESPACE, b"round-%d" % last) in writer._prepared
