"""The swarm memory's bounds (what strangers can make a peer remember, and for how long), and
a node on loopback that finds the swarm again through it when its bootstrap peer is gone."""

from __future__ import annotations

import json
import os
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from dandelion_p2p.identity import Identity
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.net.swarm_memory import (
    MAX_ADDRS,
    MAX_AGE,
    MAX_FILE_BYTES,
    MAX_PEERS,
    MAX_PER_NETWORK,
    MEMORY_FILENAME,
    ROLE_DHT,
    ROLE_RELAY,
    SwarmMemory,
    load_memory,
    save_memory,
)
from dandelion_p2p.services import DHT_NAMESPACES
from tests.swarm import public_settings, running_node, serve_node

NOW = 1_800_000_000.0


def pid(i: int) -> bytes:
    return b"\x00\x24\x08\x01\x12\x20" + i.to_bytes(32, "big")


def addr(ip: str, port: int = 4001) -> str:
    return f"/ip4/{ip}/tcp/{port}"


def test_one_network_holds_at_most_its_share_and_keeps_the_newest() -> None:
    memory = SwarmMemory()
    for i in range(50):
        assert memory.note(pid(i), (addr(f"10.9.9.{i}"),), ROLE_DHT, "10.9.9.0/24", NOW + i)
    kept = memory.peers(NOW + 100)
    assert len(kept) == MAX_PER_NETWORK
    assert {p.peer_id for p in kept} == {pid(i) for i in range(50 - MAX_PER_NETWORK, 50)}


def test_many_networks_fill_at_most_max_peers_evicting_the_least_recently_seen() -> None:
    memory = SwarmMemory()
    for i in range(MAX_PEERS * 3):
        net = f"10.{i // 256}.{i % 256}.0/24"
        memory.note(pid(i), (addr(net.split("/")[0]),), ROLE_DHT, net, NOW + i)
    assert len(memory) == MAX_PEERS
    oldest_kept = min(p.last_seen for p in memory.peers(NOW + 1000))
    assert oldest_kept == NOW + MAX_PEERS * 2


def test_relays_come_first_and_old_entries_are_forgotten() -> None:
    memory = SwarmMemory()
    memory.note(pid(1), (addr("10.0.1.1"),), ROLE_DHT, "10.0.1.0/24", NOW)
    memory.note(pid(2), (addr("10.0.2.1"),), ROLE_RELAY, "10.0.2.0/24", NOW - 3600)
    memory.note(pid(3), (addr("10.0.3.1"),), ROLE_DHT, "10.0.3.0/24", NOW - MAX_AGE - 1)
    assert [p.peer_id for p in memory.peers(NOW)] == [pid(2), pid(1)]
    assert [p.peer_id for p in memory.peers(NOW, ROLE_RELAY)] == [pid(2)]


def test_addresses_are_bounded_direct_and_well_formed() -> None:
    memory = SwarmMemory()
    many = tuple(addr("10.0.0.1", 4000 + i) for i in range(10))
    relay_id = "12D3KooWAr36u5cnrPyThZHbSFaXE8uwVZ5RD1GyY4ZQorZHxZaG"
    relayed = f"/ip4/10.0.0.2/tcp/1/p2p/{relay_id}/p2p-circuit"
    memory.note(pid(1), (relayed, "not an address", "/ip4/" + "1" * 300, *many), ROLE_DHT,
                "10.0.0.0/24", NOW)
    (entry,) = memory.peers(NOW)
    assert entry.addrs == many[:MAX_ADDRS]
    # Nothing dialable, no entry; an unknown origin, no entry.
    assert not memory.note(pid(2), (relayed,), ROLE_DHT, "10.0.0.0/24", NOW)
    assert not memory.note(pid(3), (addr("10.0.0.3"),), ROLE_DHT, "unknown", NOW)
    assert not memory.note(pid(4), (addr("10.0.0.4"),), "boss", "10.0.0.0/24", NOW)


def test_roles_merge_and_the_file_round_trips(tmp_path: Path) -> None:
    memory = SwarmMemory()
    memory.note(pid(1), (addr("10.0.1.1"),), ROLE_DHT, "10.0.1.0/24", NOW)
    memory.note(pid(1), (), ROLE_RELAY, "10.0.1.0/24", NOW + 1)
    path = tmp_path / "swarm.json"
    save_memory(memory, path)
    loaded = load_memory(path, NOW + 2)
    (entry,) = loaded.peers(NOW + 2)
    assert entry.roles == {ROLE_DHT, ROLE_RELAY}
    assert entry.addrs == (addr("10.0.1.1"),)
    assert entry.last_seen == NOW + 1


def test_a_tampered_or_oversized_file_is_bounded_or_ignored(tmp_path: Path) -> None:
    path = tmp_path / "swarm.json"
    entries = [
        {"peer_id": pid(i).hex(), "addrs": [addr("10.7.7.7")], "roles": [ROLE_DHT],
         "network": "10.7.7.0/24", "last_seen": NOW}
        for i in range(20)
    ]
    entries.append({"peer_id": "zz", "addrs": [], "roles": [], "network": 1, "last_seen": "x"})
    path.write_text(json.dumps({"version": 1, "peers": entries}))
    assert len(load_memory(path, NOW)) == MAX_PER_NETWORK
    path.write_bytes(b"{" + b" " * MAX_FILE_BYTES + b"}")
    assert len(load_memory(path, NOW)) == 0
    path.write_bytes(os.urandom(100))
    assert len(load_memory(path, NOW)) == 0
    assert len(load_memory(tmp_path / "missing.json", NOW)) == 0


async def test_a_node_whose_bootstrap_died_rejoins_through_the_peers_it_remembers(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        stop_boot = trio.Event()
        boot = await nursery.start(serve_node, public_settings(relay=True), stop_boot)
        boot_addr = (boot.full_addrs()[0],)
        other = await stack.enter_async_context(
            running_node(public_settings(relay=True, bootstrap=boot_addr))
        )
        settings = public_settings(bootstrap=boot_addr, data_dir=tmp_path)
        identity = Identity.generate()
        first = SwarmNode(identity, settings, namespaces=DHT_NAMESPACES)
        async with first.running():
            with trio.fail_after(20):
                while other.peer_id.to_bytes() not in first.dht.table:  # type: ignore[union-attr]
                    await trio.sleep(0.1)
        assert (tmp_path / MEMORY_FILENAME).exists()
        stop_boot.set()
        await trio.sleep(0.5)

        again = SwarmNode(identity, settings, namespaces=DHT_NAMESPACES)
        async with again.running():
            # At once, or on the next rejoin check if the dead peer's socket still answered.
            with trio.fail_after(30):
                while not again.is_connected(other.peer_id):
                    await trio.sleep(0.1)
            assert other.peer_id.to_bytes() in [ref.peer_id for ref in again.recall.fallback]
            assert again.dht is not None and len(again.dht.table) >= 1
            assert await again.send_note(other.peer_id, "back") == "received: back"
