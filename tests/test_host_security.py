"""Only Noise secures connections: a dialer cannot claim a peer id it holds no key for."""

from __future__ import annotations

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from multiaddr import Multiaddr

from dandelion_p2p.identity import Identity
from dandelion_p2p.net.host import build_host

LOOPBACK = [Multiaddr("/ip4/127.0.0.1/tcp/0")]


async def test_plaintext_dialer_is_refused_and_noise_accepted() -> None:
    victim = build_host(Identity.generate())
    key_pair = create_new_key_pair()
    plaintext = new_host(
        key_pair=key_pair, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)}
    )
    honest = build_host(Identity.generate())
    async with victim.run(LOOPBACK), plaintext.run(LOOPBACK), honest.run(LOOPBACK):
        addrs = [ma for lst in victim.get_network().listeners.values() for ma in lst.get_addrs()]
        with pytest.raises(Exception), trio.fail_after(10):  # noqa: B017 - any refusal will do
            await plaintext.connect(PeerInfo(victim.get_id(), addrs))
        assert not victim.get_network().get_connections(plaintext.get_id())
        with trio.fail_after(10):
            await honest.connect(PeerInfo(victim.get_id(), addrs))
        assert victim.get_network().get_connections(honest.get_id())
