"""Dial-back between real nodes on loopback: the adapter's probes and the node's verdict."""

from __future__ import annotations

from dandelion_p2p.net.dialback.protocol import dial_back_request
from dandelion_p2p.net.dialback.service import ask_dial_back
from tests.swarm import public_settings, running_node

CLOSED = "/ip4/127.0.0.1/tcp/1"


async def test_a_node_in_auto_mode_learns_by_dial_back_that_it_is_reachable() -> None:
    async with running_node(public_settings(relay=True)) as helper:
        settings = public_settings(bootstrap=(helper.full_addrs()[0],), reachability="auto")
        async with running_node(settings) as node:
            assert node.reachable
            assert node.dht is not None and node.dht.server

            listening = node.listen_addrs()
            ask = dial_back_request([CLOSED, *listening])
            assert ask is not None
            result = await ask_dial_back(node.host, helper.peer_id, ask, timeout=5.0)
            assert result.observed_ip == "127.0.0.1"
            assert list(result.reachable) == listening
