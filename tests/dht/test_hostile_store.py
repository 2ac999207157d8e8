"""Hostile peers against one DHT server's record store, over real libp2p hosts on loopback.

Honest peers sit in 127.0.0.0/24; the attacker listens in 127.0.9.0/24, a network of its own,
and is dialled by the victim, so the victim sees its connection come from that network.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from dandelion_p2p.errors import RemoteRejected
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.announce import (
    MAX_TTL_MS,
    MEMBERS_NAMESPACE,
    RELAYS_NAMESPACE,
    PeerAnnouncement,
    encode_announcement,
)
from dandelion_p2p.net.dht.messages import (
    DHT,
    MAX_ADDR_LEN,
    MAX_ADDRS,
    MAX_FRAME,
    PROTOCOL_ID,
    GetRecords,
    PutAck,
    PutRecord,
    Records,
)
from dandelion_p2p.net.dht.node import now_ms
from dandelion_p2p.net.dht.records import StoreLimits, routing_key, sign_record
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.net.origin import peer_network
from dandelion_p2p.net.streams import request
from dandelion_p2p.wire import RejectCode
from tests.swarm import public_settings, running_node

ATTACKER_NETWORK = "/ip4/127.0.9.1/tcp/0"
NETWORK_KEY = b"swarm-under-attack"


def announcement(tag: str, *, big: bool = False) -> bytes:
    if big:
        addrs = tuple(f"/dns4/{tag[:8]}{i:02d}".ljust(MAX_ADDR_LEN, "x") for i in range(MAX_ADDRS))
    else:
        addrs = (f"/ip4/10.0.0.1/tcp/{abs(hash(tag)) % 60000 + 1}",)
    return encode_announcement(PeerAnnouncement(addrs=addrs, reachable=True))


@asynccontextmanager
async def victim_and_attacker(
    **victim_overrides: object,
) -> AsyncIterator[tuple[SwarmNode, SwarmNode]]:
    async with AsyncExitStack() as stack:
        victim = await stack.enter_async_context(
            running_node(public_settings(**victim_overrides))
        )
        attacker = await stack.enter_async_context(
            running_node(public_settings(listen=(ATTACKER_NETWORK,)))
        )
        # The victim dials the attacker, so the connection's remote address is the attacker's
        # own network rather than the loopback source the kernel picks for an outgoing dial.
        await dial(victim, attacker)
        yield victim, attacker


async def dial(caller: SwarmNode, callee: SwarmNode) -> None:
    await caller.host.connect(
        PeerInfo(callee.host.get_id(), [Multiaddr(a) for a in callee.host.get_addrs()])
    )


async def store_at(sender: SwarmNode, victim: SwarmNode, record_msg: PutRecord) -> bool:
    try:
        reply = await request(
            sender.host, victim.host.get_id(), PROTOCOL_ID, record_msg, DHT,
            max_reply=MAX_FRAME, timeout=10.0,
        )
    except RemoteRejected as exc:
        assert exc.code in (RejectCode.RATE_LIMITED,), exc
        return False
    assert isinstance(reply, PutAck)
    return True


async def publish_honestly(publisher: SwarmNode, victim: SwarmNode, namespace: str) -> None:
    record = sign_record(
        publisher.identity, namespace, NETWORK_KEY,
        announcement(publisher.identity.peer_id_bytes.hex()), now_ms(), now_ms() + 600_000,
    )
    await dial(publisher, victim)
    assert await store_at(publisher, victim, PutRecord(record=record)), "honest put refused"


async def flood_fresh_publishers(
    attacker: SwarmNode, victim: SwarmNode, namespace: str, count: int
) -> tuple[int, int]:
    stored = refused = 0
    for i in range(count):
        fresh = Identity.generate()
        longest = now_ms() + MAX_TTL_MS + 30_000
        record = sign_record(fresh, namespace, NETWORK_KEY, announcement(f"sybil{i}"), 1, longest)
        if await store_at(attacker, victim, PutRecord(record=record)):
            stored += 1
        else:
            refused += 1
    return stored, refused


async def what_a_querier_sees(
    querier: SwarmNode, victim: SwarmNode, namespace: str
) -> set[bytes]:
    await dial(querier, victim)
    reply = await request(
        querier.host, victim.host.get_id(), PROTOCOL_ID,
        GetRecords(target=routing_key(namespace, NETWORK_KEY)), DHT,
        max_reply=MAX_FRAME, timeout=10.0,
    )
    assert isinstance(reply, Records)
    return {r.publisher for r in reply.records}


@pytest.mark.parametrize(
    "namespace, hostile",
    [
        (MEMBERS_NAMESPACE, 80),
        (RELAYS_NAMESPACE, 70),
        (MEMBERS_NAMESPACE, 1000),
        (RELAYS_NAMESPACE, 1000),
    ],
)
async def test_a_flood_of_longest_expiry_records_hides_no_honest_publisher(
    namespace: str, hostile: int
) -> None:
    async with victim_and_attacker() as (victim, attacker), AsyncExitStack() as stack:
        honest = [
            await stack.enter_async_context(running_node(public_settings())) for _ in range(3)
        ]
        querier = await stack.enter_async_context(running_node(public_settings()))
        for member in honest:
            await publish_honestly(member, victim, namespace)
        stored, refused = await flood_fresh_publishers(attacker, victim, namespace, hostile)
        seen = await what_a_querier_sees(querier, victim, namespace)
        honest_ids = {m.identity.peer_id_bytes for m in honest}
        figures = (
            f"{namespace}: {hostile} hostile records sent, {stored} stored, {refused} refused; "
            f"reply carried {len(seen)} publishers, {len(seen & honest_ids)} of 3 honest"
        )
        print(figures)
        assert honest_ids <= seen, figures
        assert stored <= StoreLimits().per_network_publishers_per_key, figures


async def test_a_newcomer_publishes_after_a_flood_of_fresh_key_publishers() -> None:
    limits = StoreLimits()
    async with victim_and_attacker() as (victim, attacker), running_node(
        public_settings()
    ) as newcomer:
        started = time.monotonic()
        stored, refused = await flood_fresh_publishers(
            attacker, victim, MEMBERS_NAMESPACE, limits.max_publishers_per_key
        )
        elapsed = time.monotonic() - started
        await publish_honestly(newcomer, victim, MEMBERS_NAMESPACE)
        held = victim.dht.store.get(routing_key(MEMBERS_NAMESPACE, NETWORK_KEY), now_ms())  # type: ignore[union-attr]
        figures = (
            f"{stored + refused} fresh-key publishers from one connection in {elapsed:.1f} s: "
            f"{stored} slots taken, {refused} refused, of {limits.max_publishers_per_key}; "
            f"newcomer stored: {newcomer.identity.peer_id_bytes in {r.publisher for r in held}}"
        )
        print(figures)
        assert stored <= limits.per_peer_publishers_per_key, figures
        assert newcomer.identity.peer_id_bytes in {r.publisher for r in held}, figures


async def flood_junk(attacker: SwarmNode, victim: SwarmNode, seconds: float) -> tuple[int, int]:
    """Big records under arbitrary member keys, one after the other, for ``seconds``."""
    stored = refused = 0
    junk = announcement("junk", big=True)
    deadline = trio.current_time() + seconds
    rng = random.Random(7)
    while trio.current_time() < deadline:
        key = rng.randbytes(16)
        record = sign_record(
            attacker.identity, MEMBERS_NAMESPACE, key, junk, 1, now_ms() + MAX_TTL_MS
        )
        if await store_at(attacker, victim, PutRecord(record=record)):
            stored += 1
        else:
            refused += 1
    return stored, refused


async def check_junk_flood(seconds: float) -> None:
    cap = 4 * 1024 * 1024
    async with victim_and_attacker(dht_store_bytes=cap) as (victim, attacker):
        stored, refused = await flood_junk(attacker, victim, seconds)
        store = victim.dht.store  # type: ignore[union-attr]
        figures = (
            f"{seconds:.0f} s of 4.8 KB junk: {stored} stored, {refused} refused; victim store "
            f"{store.total_bytes} bytes ({store.total_bytes / 2**20:.2f} MiB), cap {cap} bytes, "
            f"attacker's share {store.usage_of_peer(attacker.identity.peer_id_bytes)}"
        )
        print(figures)
        assert refused > 0, figures
        assert store.total_bytes <= cap, figures
        assert store.usage_of_peer(attacker.identity.peer_id_bytes)[1] <= (
            StoreLimits().per_peer_bytes
        ), figures


# 10 s; the store's byte caps are checked by default without sockets
# (tests/dht/test_hostile_store_core.py).
@pytest.mark.slow
async def test_junk_at_full_speed_stays_within_the_store_cap() -> None:
    await check_junk_flood(10.0)


@pytest.mark.slow
async def test_junk_at_full_speed_for_a_minute_stays_within_the_store_cap() -> None:
    await check_junk_flood(60.0)


async def test_the_attacker_is_seen_from_its_own_network() -> None:
    async with victim_and_attacker() as (victim, attacker):
        seen = peer_network(victim.host, ID(attacker.identity.peer_id_bytes), direct_only=False)
        print(f"victim sees the attacker's connection from {seen}")
        assert seen == "127.0.9.0/24"
