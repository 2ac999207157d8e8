"""Real swarm nodes on loopback: discovery through the DHT, relayed reachability, relay failover."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import pytest
import trio

from dandelion_p2p.errors import PeerUnavailable
from dandelion_p2p.net import addrs as maddrs
from dandelion_p2p.net.announce import PEER_NAMESPACE, decode_announcement
from dandelion_p2p.net.dht.node import now_ms
from dandelion_p2p.net.dht.records import NamespacePolicy, routing_key, sign_record
from dandelion_p2p.net.node import SwarmNode
from tests.swarm import public_settings, running_node, serve_node, swarm


async def _unresolved(
    nodes: list[SwarmNode], pairs: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    failures = []
    for i, j in pairs:
        asker, target = nodes[i], nodes[j]
        assert asker.dht is not None
        records = await asker.dht.get(PEER_NAMESPACE, target.identity.peer_id_bytes)
        if {r.publisher for r in records} != {target.identity.peer_id_bytes}:
            failures.append((i, j))
            continue
        assert set(decode_announcement(records[0].value).addrs) == set(target.public_addrs())
    return failures


# Twenty hosts take about a minute (records move as their publishers see the network grow):
# the slow suite; eight run by default.
@pytest.mark.parametrize("size", [8, pytest.param(20, marks=pytest.mark.slow)])
async def test_nodes_resolve_every_peer_record(size: int) -> None:
    async with swarm(size) as nodes:
        pairs = [(i, j) for i in range(size) for j in range(size) if i != j]
        # Records published while the network was small move to their final place when
        # their publishers see the network has grown (checked every few seconds).
        with trio.fail_after(60):
            while pairs:
                pairs = await _unresolved(nodes, pairs)
                if pairs:
                    await trio.sleep(1.0)
        with trio.fail_after(30):
            while len(await nodes[5].members()) < size:
                await trio.sleep(1.0)
        members = await nodes[5].members()
        assert set(members) == {n.peer_id.to_base58() for n in nodes}


async def _nat_peer(stack: AsyncExitStack, relays: list[SwarmNode]) -> SwarmNode:
    boot = tuple(r.full_addrs()[0] for r in relays)
    settings = public_settings(bootstrap=boot, reachability="private", relays_wanted=1)
    return await stack.enter_async_context(running_node(settings))


async def test_private_peers_talk_through_a_relay() -> None:
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(running_node(public_settings(relay=True)))
        a = await _nat_peer(stack, [relay])
        b = await _nat_peer(stack, [relay])
        assert not a.reachable and not b.reachable
        assert all(maddrs.is_relayed(x) for x in a.public_addrs())
        assert a.public_addrs(), "a private peer must advertise a circuit address"
        receipt = await a.send_note(b.peer_id, "hello b")
        assert receipt == "received: hello b"
        assert await b.send_note(a.peer_id, "hello a") == "received: hello a"
        assert [n.text for n in b.notes.received] == ["hello b"]
        assert [n.text for n in a.notes.received] == ["hello a"]
        # Both advertise circuit addresses only, so the first connection went through the
        # relay; on loopback DCUtR may already have upgraded it to a direct one since.
        kinds = {p["peer_id"]: p["connection"] for p in a.status()["connected_peers"]}
        assert kinds[b.peer_id.to_base58()] in ("relayed", "direct")


async def test_peer_moves_to_another_relay_when_its_relay_dies() -> None:
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        seed = await stack.enter_async_context(running_node(public_settings(relay=True)))
        boot = (seed.full_addrs()[0],)
        relay_two = await stack.enter_async_context(
            running_node(public_settings(relay=True, bootstrap=boot))
        )
        # The first relay runs in its own task so the test can stop it alone.
        stop_doomed = trio.Event()
        doomed = await nursery.start(
            serve_node, public_settings(relay=True, bootstrap=boot), stop_doomed
        )
        nat = await stack.enter_async_context(
            running_node(
                public_settings(
                    bootstrap=(doomed.full_addrs()[0],), reachability="private", relays_wanted=1
                )
            )
        )
        assert nat.reservations is not None
        assert [r["relay"] for r in nat.reservations.status()] == [doomed.peer_id.to_base58()]
        other = await stack.enter_async_context(
            running_node(public_settings(bootstrap=boot, reachability="private", relays_wanted=1))
        )
        assert await other.send_note(nat.peer_id, "before") == "received: before"

        stop_doomed.set()
        with trio.fail_after(20):
            while True:
                held = [r["relay"] for r in nat.reservations.status()]
                if held and held[0] != doomed.peer_id.to_base58():
                    break
                await trio.sleep(0.2)
        assert held[0] in {seed.peer_id.to_base58(), relay_two.peer_id.to_base58()}
        # The new circuit address is published; a peer that never talked to it finds it.
        late = await stack.enter_async_context(
            running_node(public_settings(bootstrap=boot, reachability="private", relays_wanted=1))
        )
        with trio.fail_after(20):
            while True:
                try:
                    receipt = await late.send_note(nat.peer_id, "after")
                    break
                except PeerUnavailable:
                    await trio.sleep(0.5)
        assert receipt == "received: after"


async def test_lookup_of_unknown_peer_fails_cleanly() -> None:
    async with swarm(3) as nodes:
        from dandelion_p2p.identity import Identity

        stranger = Identity.generate().peer_id
        with pytest.raises(PeerUnavailable):
            await nodes[1].lookup_peer(stranger)


async def test_a_node_whose_routing_table_emptied_rejoins_through_its_bootstrap_peer() -> None:
    async with AsyncExitStack() as stack:
        seed = await stack.enter_async_context(running_node(public_settings()))
        # Checked every half second, not every 5 s: the test waits for the check to happen.
        joiner = await stack.enter_async_context(
            running_node(public_settings(bootstrap=(seed.full_addrs()[0],), rejoin_interval=0.5))
        )
        assert joiner.dht is not None
        seed_id = seed.identity.peer_id_bytes
        assert seed_id in {c.peer_id for c in joiner.dht.table.nearest(seed_id, 20)}
        # What a timed-out first query leaves behind: the connection is up, the contact gone.
        joiner.dht.table.remove(seed_id)
        assert len(joiner.dht.table) == 0
        with trio.fail_after(15):
            while len(joiner.dht.table) == 0:
                await trio.sleep(0.2)
        assert seed_id in {c.peer_id for c in joiner.dht.table.nearest(seed_id, 20)}


async def test_a_read_hands_the_newest_version_to_replicas_holding_an_older_one() -> None:
    namespace, key = "test-notes", b"board"
    async with swarm(5) as nodes:
        for node in nodes:
            node.validator.register(namespace, NamespacePolicy(max_ttl_ms=600_000))
        writer, reader = nodes[1], nodes[3]
        assert writer.dht is not None and reader.dht is not None
        assert await writer.dht.put(namespace, key, b"v1", 300, keep=False) >= 4
        # An update that reached one replica only (the others timed out during the put).
        newer = sign_record(
            writer.identity, namespace, key, b"v2", writer.dht._seq + 1,
            int((time.time() + 300) * 1000),
        )
        lucky = next(n for n in nodes if n is not writer and n is not reader)
        assert lucky.dht is not None
        lucky.dht.store.put(newer, now_ms())
        (got,) = await reader.dht.get(namespace, key)
        assert got.value == b"v2"

        def versions() -> set[bytes]:
            out = set()
            for node in nodes:
                assert node.dht is not None
                out |= {r.value for r in node.dht.store.get(routing_key(namespace, key), now_ms())}
            return out

        with trio.fail_after(10):
            while versions() != {b"v2"}:
                await trio.sleep(0.2)
