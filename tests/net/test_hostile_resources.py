"""Hostile peers against what a node holds for them: partly received frames and relay slots.

Real libp2p hosts on real loopback sockets. An attacker's outbound TCP socket is bound to a
chosen 127.x.y.z address, so distinct /24s stand for distinct networks as on the internet.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.transport.tcp.tcp import TCP

from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht.messages import MAX_FRAME as DHT_MAX_FRAME
from dandelion_p2p.net.dht.messages import PROTOCOL_ID as DHT_PROTOCOL_ID
from dandelion_p2p.net.dialback.protocol import dial_back_request
from dandelion_p2p.net.dialback.service import ask_dial_back
from dandelion_p2p.net.host import build_host
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.services import DHT_NAMESPACES
from dandelion_p2p.wire.frame_budget import PROCESS_FRAME_BUDGET, FrameBudgetLimits
from dandelion_p2p.wire.framing import HEADER
from tests.swarm import public_settings, running_node

MiB = 1024 * 1024


def dial_from(host: IHost, source_ip: str) -> None:
    """Make every TCP dial of ``host`` leave from ``source_ip`` (its network, as seen)."""
    for transport in host.get_network().transport_manager.get_transports():  # type: ignore[attr-defined]
        if isinstance(transport, TCP):
            bound: Any = transport

            async def dial(maddr: multiaddr.Multiaddr, _t: Any = bound) -> Any:
                return await _t.dial_with_source(maddr, (source_ip, 0))

            bound.dial = dial


@asynccontextmanager
async def attacker(source_ip: str) -> AsyncIterator[IHost]:
    host = build_host(Identity.generate())
    dial_from(host, source_ip)
    async with host.run(listen_addrs=[]):
        yield host


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / MiB


# ---- partly received frames ------------------------------------------------------------------


async def stall_frames(
    host: IHost, victim: SwarmNode, streams: int, outcome: dict[str, int]
) -> None:
    """Open ``streams`` DHT streams, each announcing a frame one byte short of the limit and
    sending all but 1 KiB of it, then stalling."""
    await host.connect(PeerInfo(victim.peer_id, [multiaddr.Multiaddr(victim.listen_addrs()[0])]))
    length = DHT_MAX_FRAME - 1
    body = b"\x00" * (length - 1024)

    async def one() -> None:
        try:
            stream = await host.new_stream(victim.peer_id, [TProtocol(DHT_PROTOCOL_ID)])
            await stream.write(HEADER.pack(length) + body)
            outcome["sent"] += 1
            # A reset shows on the next read; an accepted stall just waits here.
            await stream.read(1)
            outcome["ended"] += 1
        except Exception:
            outcome["reset"] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(one)


async def settled(value: Any, quiet: float, limit: float) -> None:
    """Until ``value()`` has stayed the same for ``quiet`` seconds (at most ``limit``)."""
    with trio.move_on_after(limit):
        last, since = value(), trio.current_time()
        while trio.current_time() - since < quiet:
            await trio.sleep(0.1)
            now = value()
            if now != last:
                last, since = now, trio.current_time()


async def run_frame_attack(
    sources: list[str], streams_each: int, limits: FrameBudgetLimits
) -> dict[str, Any]:
    budget = PROCESS_FRAME_BUDGET
    async with AsyncExitStack() as stack:
        victim = await stack.enter_async_context(
            running_node(public_settings(frame_budget=limits))
        )
        stack.callback(budget.configure, FrameBudgetLimits())
        honest = await stack.enter_async_context(
            running_node(public_settings(bootstrap=(victim.full_addrs()[0],)))
        )
        hosts = [await stack.enter_async_context(attacker(ip)) for ip in sources]
        rss_before = rss_mib()
        budget.peak = budget.used
        outcome = {"sent": 0, "ended": 0, "reset": 0}
        streams = len(hosts) * streams_each
        async with trio.open_nursery() as nursery:
            for host in hosts:
                nursery.start_soon(stall_frames, host, victim, streams_each, outcome)
            # Until every stream has either delivered its partial frame or been reset.
            with trio.move_on_after(40.0):
                while outcome["sent"] + outcome["reset"] < streams:
                    await trio.sleep(0.1)
            # A write returns once yamux has the bytes, before the victim has read them: the
            # resets come after the victim reads, so wait until its budget stops moving.
            await settled(lambda: (budget.used, outcome["reset"]), quiet=1.0, limit=15.0)
            reset_by_victim = outcome["reset"]
            held_during = budget.used
            rss_during = rss_mib()
            # The budget is full of stalled frames now; an honest request still gets through.
            ask = dial_back_request(honest.listen_addrs())
            assert ask is not None
            result = await ask_dial_back(honest.host, victim.peer_id, ask, timeout=10.0)
            honest_ok = bool(result.reachable)
            nursery.cancel_scope.cancel()
        with trio.move_on_after(15.0):
            while budget.used > 0:
                await trio.sleep(0.1)
        violators = sum(1 for h in hosts if victim.violations.get(h.get_id().to_base58(), 0) > 0)
        return {
            "identities": len(hosts),
            "networks": len({ip.rsplit(".", 1)[0] for ip in sources}),
            "streams": streams,
            "declared_MiB": round(streams * DHT_MAX_FRAME / MiB, 1),
            "limit_total_MiB": limits.total_bytes / MiB,
            "limit_network_MiB": limits.per_network_bytes / MiB,
            "limit_peer_MiB": limits.per_peer_bytes / MiB,
            "peak_MiB": round(budget.peak / MiB, 2),
            "held_during_MiB": round(held_during / MiB, 2),
            "held_after_MiB": round(budget.used / MiB, 2),
            "partial_frames_sent": outcome["sent"],
            "streams_reset_by_victim": reset_by_victim,
            "violators_scored": violators,
            "honest_request_ok": honest_ok,
            "rss_before_MiB": round(rss_before, 1),
            "rss_during_MiB": round(rss_during, 1),
            "rss_after_MiB": round(rss_mib(), 1),
        }


async def test_six_identities_of_one_network_hold_at_most_the_networks_share() -> None:
    # The default budget: 64 MiB in all, 16 MiB a network, 8 MiB a peer.
    figures = await run_frame_attack(
        [f"127.0.10.{i}" for i in range(1, 7)], streams_each=12, limits=FrameBudgetLimits()
    )
    print("frame attack, 6 identities of one network:", figures)
    assert figures["peak_MiB"] <= figures["limit_network_MiB"], figures
    assert figures["streams_reset_by_victim"] > 0, figures
    assert figures["violators_scored"] == 0, figures  # each stayed within its own share
    assert figures["honest_request_ok"], figures
    assert figures["held_after_MiB"] == 0, figures


async def test_one_identity_over_its_share_is_reset_and_scored() -> None:
    figures = await run_frame_attack(["127.0.11.1"], streams_each=40, limits=FrameBudgetLimits())
    print("frame attack, 1 identity:", figures)
    assert figures["peak_MiB"] <= figures["limit_peer_MiB"], figures
    assert figures["streams_reset_by_victim"] > 0, figures
    assert figures["violators_scored"] == 1, figures
    assert figures["honest_request_ok"], figures
    assert figures["held_after_MiB"] == 0, figures


async def test_fifty_identities_of_fifty_networks_stay_within_the_total() -> None:
    # The default proportions at 1/8 scale (8 MiB in all), so the attack sends 12 MiB, not 100.
    figures = await run_frame_attack(
        [f"127.0.{20 + i}.1" for i in range(50)],
        streams_each=1,
        limits=FrameBudgetLimits.from_total(8 * MiB),
    )
    print("frame attack, 50 identities of 50 networks:", figures)
    assert figures["peak_MiB"] <= figures["limit_total_MiB"], figures
    assert figures["streams_reset_by_victim"] > 0, figures
    assert figures["honest_request_ok"], figures
    assert figures["held_after_MiB"] == 0, figures


# ---- relay reservations ----------------------------------------------------------------------


async def reserve(host: IHost, relay: SwarmNode) -> bool:
    await host.connect(PeerInfo(relay.peer_id, [multiaddr.Multiaddr(relay.listen_addrs()[0])]))
    stream = await host.new_stream(relay.peer_id, [HOP_PROTOCOL_ID])
    try:
        await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
        reply = await read_delimited_msg(stream, HopMessage)
        # 100 is OK among the circuit v2 status codes; a reply without a status is OK too.
        return not reply.HasField("status") or int(reply.status) == 100
    finally:
        with contextlib.suppress(Exception):
            await stream.close()


async def hold_reservation(
    source_ip: str,
    relay: SwarmNode,
    stop: trio.Event,
    outcome: dict[str, int],
    limiter: trio.CapacityLimiter,
) -> None:
    """One fresh identity asks for a reservation and stays connected (a reservation lives as
    long as its connection)."""
    async with attacker(source_ip) as host:
        async with limiter:
            with trio.move_on_after(20.0):
                try:
                    outcome["granted" if await reserve(host, relay) else "refused"] += 1
                except Exception:
                    outcome["failed"] += 1
        await stop.wait()


async def test_two_hundred_identities_of_one_network_leave_a_nat_peer_served() -> None:
    async with running_node(public_settings(relay=True)) as relay:
        outcome = {"granted": 0, "refused": 0, "failed": 0}
        stop = trio.Event()
        limiter = trio.CapacityLimiter(32)
        async with trio.open_nursery() as nursery:
            started = time.monotonic()
            for i in range(200):
                nursery.start_soon(
                    hold_reservation, f"127.0.0.{2 + i % 250}", relay, stop, outcome, limiter
                )
            with trio.move_on_after(60.0):
                while sum(outcome.values()) < 200:
                    await trio.sleep(0.1)
            attack_s = time.monotonic() - started

            settings = public_settings(
                bootstrap=(relay.full_addrs()[0],), reachability="private", relays_wanted=1
            )
            nat = SwarmNode(Identity.generate(), settings, namespaces=DHT_NAMESPACES)
            dial_from(nat.host, "127.0.1.5")
            started = time.monotonic()
            served_after: float | None = None
            async with nat.running():
                with trio.move_on_after(10.0):
                    while not nat.reservations.status():
                        await trio.sleep(0.1)
                    served_after = time.monotonic() - started
                resources = relay.relay_protocol.bounded_resources
                figures = {
                    "requests": 200,
                    **outcome,
                    "attack_s": round(attack_s, 1),
                    "by_network": resources.reservations_by_network(),
                    "nat_peer_served_after_s": (
                        None if served_after is None else round(served_after, 2)
                    ),
                }
            stop.set()
        print("relay reservation attack:", figures)
        assert outcome["granted"] <= resources.per_network, figures
        assert outcome["refused"] >= 200 - resources.per_network - outcome["failed"], figures
        assert served_after is not None and served_after <= 10.0, figures
        assert figures["by_network"].get("127.0.1.0/24") == 1, figures
