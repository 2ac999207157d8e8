"""The daemon process: the swarm node, its control socket, and a clean shutdown on signals."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import trio
from libp2p.peer.id import ID

from dandelion_p2p.config import DaemonConfig
from dandelion_p2p.control import serve_control
from dandelion_p2p.errors import ConfigError
from dandelion_p2p.identity import load_or_create_identity
from dandelion_p2p.net.node import NodeSettings, SwarmNode
from dandelion_p2p.net.relay import RelayLimitsConfig

log = logging.getLogger(__name__)


def node_settings(config: DaemonConfig) -> NodeSettings:
    return NodeSettings(
        listen=config.listen,
        announce=config.announce,
        bootstrap=config.bootstrap,
        network=config.network,
        relay=config.relay,
        relay_limits=RelayLimitsConfig(
            max_reservations=config.relay_max_reservations,
            max_circuits=config.relay_max_circuits,
            circuit_bytes=config.relay_circuit_bytes,
            circuit_seconds=config.relay_circuit_seconds,
            reservation_ttl=config.relay_reservation_ttl,
        ),
        reachability=config.reachability,
        relays_wanted=config.relays,
        upnp=config.upnp,
        dial_timeout=config.dial_timeout,
        request_timeout=config.request_timeout,
        data_dir=config.data_dir,
    )


def _peer_param(params: dict[str, Any]) -> ID:
    value = params.get("peer")
    if not isinstance(value, str):
        raise ConfigError("missing 'peer' (a base58 peer id)")
    try:
        return ID.from_base58(value)
    except Exception:
        raise ConfigError(f"{value!r} is not a peer id") from None


def control_handlers(node: SwarmNode) -> dict[str, Callable[[dict[str, Any]], Any]]:
    async def status(params: dict[str, Any]) -> dict[str, Any]:
        return node.status()

    async def members(params: dict[str, Any]) -> dict[str, Any]:
        found = await node.members()
        return {
            "members": {
                peer: {"addrs": list(a.addrs), "reachable": a.reachable, "roles": list(a.roles)}
                for peer, a in found.items()
            }
        }

    async def lookup(params: dict[str, Any]) -> dict[str, Any]:
        ann = await node.lookup_peer(_peer_param(params))
        return {"addrs": list(ann.addrs), "reachable": ann.reachable, "roles": list(ann.roles)}

    async def send(params: dict[str, Any]) -> dict[str, Any]:
        peer = _peer_param(params)
        text = params.get("text", "")
        if not isinstance(text, str) or len(text) > 1024:
            raise ConfigError("'text' must be a string of at most 1024 characters")
        receipt = await node.send_note(peer, text)
        return {"receipt": receipt, "verified": True}

    return {"status": status, "members": members, "lookup": lookup, "send": send}


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # py-libp2p reports every refused stream or closed connection at warning level or above;
    # in the daemon those are routine, and our own modules log what matters.
    logging.getLogger("libp2p").setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)


async def run_daemon(
    config: DaemonConfig, *, on_ready: Callable[[SwarmNode], None] | None = None
) -> None:
    """Run until SIGINT or SIGTERM (or cancellation), then shut down within a few seconds.

    Raises:
        ConfigError: the identity or control socket cannot be used.
    """
    config.data_dir.mkdir(parents=True, exist_ok=True)
    identity = load_or_create_identity(config.identity_path)
    socket_path = config.control_socket_path
    node = SwarmNode(identity, node_settings(config))
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as outer:
            async with node.running():
                await outer.start(serve_control, socket_path, control_handlers(node))
                if on_ready is not None:
                    on_ready(node)
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    break
            outer.cancel_scope.cancel()
