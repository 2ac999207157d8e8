"""Construction of the libp2p host (TCP, Noise, yamux) with the settings we rely on."""

from __future__ import annotations

from collections.abc import Sequence

import libp2p.network.swarm as _swarm
import libp2p.stream_muxer.yamux.yamux as _yamux
import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair as create_ed25519_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from dandelion_p2p.identity import Identity
from dandelion_p2p.net import yamux_control

# Noise carries at most 65,519 plaintext bytes per message. yamux's default 64 KiB frame is
# slightly larger, so every frame cost two Noise messages; matching the sizes moves ~30 % more
# bytes per CPU second.
NOISE_MAX_PLAINTEXT = 65_519
# The swarm waits this long after starting a dial before trying the next address, even when the
# first dial already succeeded: with it, every connect took 250 ms on loopback. Our callers
# bound each dial with their own timeout, so addresses are tried without a head start.
HAPPY_EYEBALLS_DELAY = 0.0


def apply_libp2p_tuning() -> None:
    _yamux.MAX_MESSAGE_SIZE = NOISE_MAX_PLAINTEXT
    _swarm._HAPPY_EYEBALLS_DELAY = HAPPY_EYEBALLS_DELAY
    yamux_control.install()


def libp2p_key_pair(identity: Identity) -> KeyPair:
    return create_ed25519_key_pair(identity.seed)


def libp2p_peer_id(peer: bytes) -> ID:
    """libp2p's peer id type for our ``PeerId`` (or raw id bytes), for calls into the host."""
    return peer if isinstance(peer, ID) else ID(bytes(peer))


async def _no_auto_connect() -> None:
    return None


def connection_config(
    *, max_connections: int = 1024, dial_timeout: float = 10.0
) -> ConnectionConfig:
    return ConnectionConfig(
        max_connections=max_connections,
        high_watermark=max(2, max_connections - 64),
        # The connection manager would otherwise redial known peers on its own every 30 s;
        # which peers we stay connected to is the DHT's and relay manager's decision.
        low_watermark=0,
        min_connections=0,
        auto_connect_interval=3600.0,
        dial_timeout=dial_timeout,
        # One connection per peer: the swarm stops dialing other addresses only once this many
        # succeeded, so a second would make every dial wait for the slowest address.
        max_connections_per_peer=1,
        enable_health_monitoring=True,
        health_initial_delay=5.0,
        health_check_interval=10.0,
        ping_timeout=3.0,
    )


def build_host(
    identity: Identity,
    *,
    announce: Sequence[str] = (),
    max_connections: int = 1024,
    dial_timeout: float = 10.0,
) -> IHost:
    apply_libp2p_tuning()
    key_pair = libp2p_key_pair(identity)
    host = new_host(
        key_pair=key_pair,
        # Noise only. py-libp2p otherwise also accepts /plaintext/2.0.0, where a dialer can
        # claim any peer id, and SECIO: either would let one peer act in another's name.
        sec_opt={
            NOISE_PROTOCOL_ID: NoiseTransport(
                key_pair, noise_privkey=create_x25519_key_pair().private_key
            )
        },
        muxer_preference="YAMUX",
        connection_config=connection_config(
            max_connections=max_connections, dial_timeout=dial_timeout
        ),
        announce_addrs=[multiaddr.Multiaddr(a) for a in announce] or None,
    )
    # The swarm's auto-connector dials every peer in the peerstore to reach a connection
    # target between the watermarks; which peers to stay connected to is decided by our
    # DHT and relay manager, so it is switched off.
    host.get_network().auto_connector.maybe_connect = _no_auto_connect  # type: ignore[attr-defined]
    return host
