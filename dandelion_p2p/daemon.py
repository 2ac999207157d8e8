"""The daemon process: the swarm node, its control socket, and a clean shutdown on signals."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import trio
from libp2p.peer.id import ID

from dandelion_p2p.config import DaemonConfig
from dandelion_p2p.context import DaemonContext, Handler
from dandelion_p2p.control.server import serve_control
from dandelion_p2p.dataplane.forwarding import DataPortForwarding
from dandelion_p2p.dataplane.messages import format_endpoint
from dandelion_p2p.dataplane.service import DataPlane
from dandelion_p2p.errors import ConfigError
from dandelion_p2p.identity import load_or_create_identity
from dandelion_p2p.local_settings import load_local_settings, save_local_settings
from dandelion_p2p.loghub import LogHub
from dandelion_p2p.net import addrs as maddrs
from dandelion_p2p.net.node import NodeSettings, SwarmNode
from dandelion_p2p.net.recall import wait_for_swarm
from dandelion_p2p.net.relay import RelayLimitsConfig
from dandelion_p2p.services import DHT_NAMESPACES, create_services
from dandelion_p2p.telemetry import Telemetry
from dandelion_p2p.wire.frame_budget import FrameBudgetLimits

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
            max_reservations_per_network=config.relay_reservations_per_network,
        ),
        frame_budget=FrameBudgetLimits.from_total(config.frame_budget_bytes),
        reachability=config.reachability,
        relays_wanted=config.relays,
        upnp=config.upnp,
        dial_timeout=config.dial_timeout,
        request_timeout=config.request_timeout,
        data_dir=config.data_dir,
        dht_store_bytes=config.dht_store_bytes,
    )


def _peer_param(params: dict[str, Any]) -> ID:
    value = params.get("peer")
    if not isinstance(value, str):
        raise ConfigError("missing 'peer' (a base58 peer id)")
    try:
        return ID.from_base58(value)
    except Exception:
        raise ConfigError(f"{value!r} is not a peer id") from None


def control_handlers(ctx: DaemonContext) -> dict[str, Handler]:
    node = ctx.node

    async def status(params: dict[str, Any]) -> dict[str, Any]:
        return ctx.status()

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

    async def settings_get(params: dict[str, Any]) -> dict[str, Any]:
        return load_local_settings(ctx.config.data_dir).to_dict()

    async def settings_set(params: dict[str, Any]) -> dict[str, Any]:
        changes = params.get("changes")
        if not isinstance(changes, dict):
            raise ConfigError("missing 'changes' (an object of settings to change)")
        updated = load_local_settings(ctx.config.data_dir).updated(changes)
        save_local_settings(ctx.config.data_dir, updated)
        log.info("local settings changed: %s", ", ".join(sorted(changes)))
        return updated.to_dict()

    return {
        "status": status,
        "members": members,
        "lookup": lookup,
        "send": send,
        "settings.get": settings_get,
        "settings.set": settings_set,
    }


def configure_logging(level: str, hub: LogHub | None = None) -> None:
    """Log to stderr and, when given, to ``hub`` (the live log the web UI shows)."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if hub is not None:
        hub.setLevel(getattr(logging, level.upper()))
        logging.getLogger().addHandler(hub)
    # multiaddr logs every address it parses at debug level: thousands of lines a minute.
    logging.getLogger("multiaddr").setLevel(logging.INFO)
    if os.environ.get("LIBP2P_DEBUG"):
        return  # py-libp2p's own per-module levels and log file, as its documentation says
    # py-libp2p reports every refused stream or closed connection at warning level or above;
    # in the daemon those are routine, and our own modules log what matters. Importing libp2p
    # detaches its loggers from ours (without LIBP2P_DEBUG): debug attaches them again.
    libp2p = logging.getLogger("libp2p")
    libp2p.setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)
    if level == "debug":
        libp2p.handlers.clear()
        libp2p.propagate = True


class DataplaneAddresses(NamedTuple):
    bind_ip: str
    """IP the data plane listens on."""
    advertise_ip: str | None
    """IP to tell peers with our data port, or None to offer the bound (or routed) one."""
    direct: bool
    """Whether peers are told to dial the data plane at all (else its channels ride libp2p)."""


def dataplane_addresses(node: SwarmNode, data_port: int = 0) -> DataplaneAddresses:
    """Where the data plane listens and what peers are told to dial.

    The data plane listens on the same interface as the host's first TCP listen address; when
    that is a wildcard, peers are told the first dialable IP the node advertises. An
    ``--announce`` address that is not this machine's own (a port forwarded on a NAT) forwards
    the libp2p port only: the data plane's endpoint there is offered only when ``data_port``
    names the port forwarded for it, else peers would wait ``connect_timeout`` on a port
    nothing forwards before every channel fell back to the libp2p stream.
    """
    bind = next(iter(_ips(node.settings.listen)), "0.0.0.0")
    forwarded = next((ip for ip in _ips(node.settings.announce) if not is_own_address(ip)), None)
    if forwarded is not None:
        if data_port == 0:
            log.info(
                "data plane: %s is announced but is not this machine's address; its channels "
                "go over libp2p streams (--data-port names a port forwarded for it)", forwarded
            )
            return DataplaneAddresses(bind, None, False)
        return DataplaneAddresses(bind, forwarded, True)
    if bind not in ("0.0.0.0", "::"):
        return DataplaneAddresses(bind, None, True)
    return DataplaneAddresses(bind, next(iter(_ips(node.public_addrs())), None), True)


def _ips(addrs: list[str] | tuple[str, ...]) -> list[str]:
    """The IPs of the direct (not relayed) addresses, in order."""
    return [ip for addr in addrs
            if not maddrs.is_relayed(addr) and (ip := maddrs.ip_of(addr)) is not None]


def is_own_address(ip: str) -> bool:
    """Whether ``ip`` is an address of one of this machine's interfaces (binding to it works;
    nothing is sent)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True


async def _serve_dataplane(
    dataplane: DataPlane,
    advertise_ip: str | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(dataplane.run)
        if advertise_ip is not None and dataplane.bound_port is not None:
            dataplane.advertise = format_endpoint(advertise_ip, dataplane.bound_port)
        task_status.started()


async def run_daemon(
    config: DaemonConfig,
    *,
    on_ready: Callable[[SwarmNode], None] | None = None,
    logs: LogHub | None = None,
) -> None:
    """Run until SIGINT or SIGTERM (or cancellation), then shut down within a few seconds.

    Raises:
        ConfigError: the identity or control socket cannot be used.
    """
    config.data_dir.mkdir(parents=True, exist_ok=True)
    identity = load_or_create_identity(config.identity_path)
    socket_path = config.control_socket_path
    node = SwarmNode(identity, node_settings(config), namespaces=DHT_NAMESPACES)
    if logs is None:
        logs = LogHub()
    logs.bind()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as outer:
            async with node.running():
                addresses = dataplane_addresses(node, config.data_port)
                dataplane = DataPlane(
                    node.host,
                    identity,
                    listen_ip=addresses.bind_ip,
                    port=config.data_port,
                    reachable=node.reachable and addresses.direct,
                )
                await outer.start(_serve_dataplane, dataplane, addresses.advertise_ip)
                await outer.start(DataPortForwarding(node, dataplane).run)
                ctx = DaemonContext(
                    config=config,
                    identity=identity,
                    node=node,
                    dataplane=dataplane,
                    logs=logs,
                    telemetry=Telemetry(),
                )
                ctx.add_handlers(control_handlers(ctx))
                for service in create_services(ctx):
                    await outer.start(service.run)
                    log.info("%s service started", service.name)
                await outer.start(serve_control, socket_path, ctx.handlers)
                async with trio.open_nursery() as waiters:

                    async def when_joined(ready: Callable[[SwarmNode], None]) -> None:
                        # "ready" means part of a swarm: a peer whose every bootstrap (and
                        # remembered) peer is gone says so, and keeps trying, instead.
                        await wait_for_swarm(node)
                        ready(node)

                    if on_ready is not None:
                        waiters.start_soon(when_joined, on_ready)

                    async def on_signal() -> None:
                        async for signum in signals:
                            log.info("received %s, shutting down", signal.Signals(signum).name)
                            break
                        ctx.shutdown.set()

                    waiters.start_soon(on_signal)
                    await ctx.shutdown.wait()
                    waiters.cancel_scope.cancel()
                await _drain(ctx, signals)
            outer.cancel_scope.cancel()


DRAIN_LIMIT = 45.0
"""Seconds the daemon's services get to end gracefully once it is asked to stop: longer than
a worker's grace after SIGTERM (``sync.supervisor.STOP_GRACE``), so that it is stopped, not
abandoned."""


async def _drain(ctx: DaemonContext, signals: Any) -> None:
    """Run the services' drain hooks; a second signal, or ``DRAIN_LIMIT``, cuts them short."""
    if not ctx.drains:
        return
    with trio.move_on_after(DRAIN_LIMIT) as limit:
        async with trio.open_nursery() as nursery:

            async def on_second_signal() -> None:
                async for signum in signals:
                    log.warning("received %s again: stopping now", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            async def drain_all() -> None:
                for drain in ctx.drains:
                    await drain()
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_second_signal)
            nursery.start_soon(drain_all)
    if limit.cancelled_caught:
        log.warning("services did not stop within %g s; stopping them now", DRAIN_LIMIT)
