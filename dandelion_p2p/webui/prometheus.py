"""``/metrics`` in the Prometheus text exposition format (version 0.0.4): the latest value of
every telemetry series, and the node's own numbers from its status."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from dandelion_p2p.telemetry import Telemetry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "dandelion_"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _gauge(name: str, help_text: str, value: float, labels: str = "") -> Iterable[str]:
    yield f"# HELP {name} {_escape_help(help_text)}"
    yield f"# TYPE {name} gauge"
    yield f"{name}{labels} {_number(value)}"


def node_numbers(status: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(metric name without prefix, help, value) from the daemon's ``status``."""
    now = time.time()
    scores = status.get("scores") or []
    banned = [s for s in scores if (s.get("banned_until") or 0) > now]
    return [
        ("node_connected_peers", "peers with an open connection", len(status["connected_peers"])),
        (
            "node_relayed_peers",
            "connected peers reached only through a relay",
            sum(1 for p in status["connected_peers"] if p.get("connection") == "relayed"),
        ),
        ("node_routing_table_size", "peers in the DHT routing table",
         status.get("routing_table_size", 0)),
        ("node_stored_records", "DHT records stored here", status.get("stored_records", 0)),
        ("node_relay_reservations", "active relay reservations",
         len(status.get("relay_reservations") or [])),
        ("node_reachable", "1 when others can dial this node directly",
         1.0 if status.get("reachable") else 0.0),
        ("node_banned_peers", "peers currently banned", len(banned)),
        ("node_protocol_violations", "protocol violations seen since start",
         sum((status.get("violations") or {}).values())),
        ("node_uptime_seconds", "seconds since the node started", status.get("uptime_s", 0.0)),
    ]


def render_metrics(status: dict[str, Any], telemetry: Telemetry) -> str:
    lines: list[str] = []
    info_labels = ",".join(
        f'{key}="{_escape_label(str(status.get(key, "")))}"'
        for key in ("peer_id", "version", "network")
    )
    lines += _gauge(PREFIX + "node_info", "this node's identity", 1.0, "{" + info_labels + "}")
    for name, help_text, value in node_numbers(status):
        lines += _gauge(PREFIX + name, help_text, float(value))
    for name in telemetry.names():
        point = telemetry.latest(name)
        if point is not None:
            lines += _gauge(PREFIX + name, telemetry.help_text(name), point.value)
    return "\n".join(lines) + "\n"
