"""What the daemon hands each service it runs: its parts, and the registries through which
services talk to each other (control handlers, status sections, drains).

Feature packages depend on this module, never on ``services`` (the composition root that
imports them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from dandelion_p2p.config import DaemonConfig
from dandelion_p2p.dataplane.service import DataPlane
from dandelion_p2p.identity import Identity
from dandelion_p2p.loghub import LogHub
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.telemetry import Telemetry

Handler = Callable[[dict[str, Any]], Awaitable[Any]]




@dataclass
class DaemonContext:
    config: DaemonConfig
    identity: Identity
    node: SwarmNode
    dataplane: DataPlane
    logs: LogHub
    telemetry: Telemetry
    handlers: dict[str, Handler] = field(default_factory=dict)
    """Control methods by name: served on the control socket and callable by services."""
    status_sections: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    """Extra parts of ``status``: section name -> a function returning JSON-able data."""
    shutdown: trio.Event = field(default_factory=trio.Event)
    """Set when the daemon is asked to stop (a service may also set it)."""
    drains: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Run when the daemon stops, while the node and the control socket still serve, before
    services are cancelled: what must end gracefully (a worker writing its stop checkpoint)
    ends here. Each is bounded by ``DRAIN_LIMIT`` seconds."""

    def add_handlers(self, handlers: dict[str, Handler]) -> None:
        clash = sorted(set(handlers) & set(self.handlers))
        if clash:
            raise ValueError(f"control methods registered twice: {', '.join(clash)}")
        self.handlers.update(handlers)

    def status(self) -> dict[str, Any]:
        status = self.node.status()
        for name, section in self.status_sections.items():
            status[name] = section()
        return status


class Service(Protocol):
    name: str

    async def run(
        self, *, task_status: trio.TaskStatus[None] = ...  # type: ignore[name-defined]
    ) -> None:
        """Serve until cancelled; call ``task_status.started()`` once ready."""
