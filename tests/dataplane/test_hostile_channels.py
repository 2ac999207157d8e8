"""A peer that opens channel after channel: each holds up to a credit window of our memory, so
the number it may hold open is bounded, and an honest peer still gets its channel."""

from __future__ import annotations

import pytest
import trio

from dandelion_p2p.dataplane.admission import (
    DEFAULT_CHANNELS_PER_PEER,
    ChannelLimits,
    ChannelSlots,
)
from dandelion_p2p.dataplane.channel import Channel
from dandelion_p2p.dataplane.service import DataPlane
from dandelion_p2p.errors import DandelionError
from tests.swarm import swarm

LOOPBACK = "127.0.0.1"


def test_slots_bound_each_peer_each_network_and_the_total() -> None:
    slots = ChannelSlots(ChannelLimits(per_peer=2, per_network=3, total=4))
    assert slots.take(b"a", "n1") is None and slots.take(b"a", "n1") is None
    assert slots.take(b"a", "n1") == "peer"
    assert slots.take(b"b", "n1") is None
    assert slots.take(b"c", "n1") == "network"
    assert slots.take(b"c", "n2") is None
    assert slots.take(b"d", "n3") == "total"
    assert slots.held == 4 and slots.refused == 3
    slots.give_back(b"a", "n1")
    assert slots.take(b"c", "n1") is None
    for peer, network in ((b"a", "n1"), (b"b", "n1"), (b"c", "n1"), (b"c", "n2")):
        slots.give_back(peer, network)
    assert slots.held == 0 and slots.held_by(b"a") == 0
    with pytest.raises(ValueError):
        ChannelLimits(per_peer=5, per_network=4)


async def test_a_channel_flood_holds_its_bound_and_an_honest_peer_gets_through() -> None:
    async with swarm(3) as (flooder, victim, honest), trio.open_nursery() as nursery:
        planes = [DataPlane(n.host, n.identity, listen_ip=LOOPBACK, reachable=True)
                  for n in (flooder, victim, honest)]
        for plane in planes:
            await nursery.start(plane.run)
        flood_plane, victim_plane, honest_plane = planes
        release = trio.Event()
        served: list[bytes] = []

        async def hold(channel: Channel) -> None:
            served.append(channel.peer_id.to_bytes())
            await channel.send(b"ok")
            await release.wait()

        victim_plane.register("hold", hold)
        opened: list[Channel] = []
        refused = 0
        attempts = 3 * DEFAULT_CHANNELS_PER_PEER
        for _ in range(attempts):
            try:
                with trio.fail_after(10):
                    channel = await flood_plane.open(victim.peer_id, "hold")
                    assert await channel.receive() == b"ok"
                opened.append(channel)
            except (DandelionError, trio.TooSlowError):
                refused += 1
        print(f"{attempts} channels asked by one peer: {len(opened)} held, {refused} refused; "
              f"victim holds {victim_plane.inbound.held}")
        assert len(opened) == DEFAULT_CHANNELS_PER_PEER
        assert victim_plane.inbound.held_by(flooder.identity.peer_id_bytes) == len(opened)
        with trio.fail_after(10):
            channel = await honest_plane.open(victim.peer_id, "hold")
            assert await channel.receive() == b"ok"
        assert served.count(honest.identity.peer_id_bytes) == 1
        # Slots come back when channels end.
        release.set()
        for ch in [*opened, channel]:
            await ch.aclose()
        with trio.fail_after(10):
            while victim_plane.inbound.held:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
