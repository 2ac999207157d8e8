"""Samples the swarm node's own numbers into telemetry every few seconds, so the charts and
``/metrics`` show how the node is doing before any training runs."""

from __future__ import annotations

import logging
import time

import trio

from dandelion_p2p.context import DaemonContext

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 2.0

SERIES_HELP = {
    "connected_peers": "peers with an open connection",
    "direct_peers": "connected peers with a direct connection",
    "relayed_peers": "connected peers reached only through a relay",
    "routing_table_size": "peers in the DHT routing table",
    "stored_records": "DHT records stored on this node",
    "relay_reservations": "active reservations on relays (behind NAT)",
    "banned_peers": "peers currently banned for misbehaviour",
}


def sample(ctx: DaemonContext) -> dict[str, float]:
    status = ctx.node.status()
    connected = status["connected_peers"]
    relayed = sum(1 for p in connected if p.get("connection") == "relayed")
    now = time.time()
    return {
        "connected_peers": len(connected),
        "direct_peers": len(connected) - relayed,
        "relayed_peers": relayed,
        "routing_table_size": status["routing_table_size"],
        "stored_records": status["stored_records"],
        "relay_reservations": len(status["relay_reservations"]),
        "banned_peers": sum(
            1 for s in status["scores"] if (s.get("banned_until") or 0.0) > now
        ),
    }


class NodeMetrics:
    name = "node metrics"

    def __init__(self, ctx: DaemonContext, interval: float = SAMPLE_INTERVAL) -> None:
        self.ctx = ctx
        self.interval = interval
        for name, help_text in SERIES_HELP.items():
            ctx.telemetry.describe(name, help_text)

    def record_once(self) -> None:
        when = time.time()
        for name, value in sample(self.ctx).items():
            self.ctx.telemetry.record(name, value, when)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED  # type: ignore[name-defined]
    ) -> None:
        task_status.started()
        while True:
            try:
                self.record_once()
            except Exception:
                # A sampling bug must cost a chart, never the daemon.
                log.exception("node metrics: sampling failed")
            await trio.sleep(self.interval)


def create(ctx: DaemonContext) -> NodeMetrics:
    return NodeMetrics(ctx)
