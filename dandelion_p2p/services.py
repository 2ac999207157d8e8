"""What the daemon runs beside its swarm node: the web UI, the dataset role, the training
worker's supervisor and swarm sync. Each is a ``Service`` made from the ``DaemonContext``
(``dandelion_p2p.context``).

A service module exposes ``create(ctx) -> Service | None`` (None when the configuration does
not ask for it) and is listed in ``SERVICE_MODULES``. Services talk to each other only through
the context: control handlers (the same methods the control socket serves), status sections,
the log hub and telemetry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from dandelion_p2p.averaging.matchmaking import register_namespace as register_averaging_namespace
from dandelion_p2p.averaging.proofs import register_namespace as register_proof_namespace
from dandelion_p2p.context import DaemonContext, Service
from dandelion_p2p.dataset.namespaces import register_namespaces as register_dataset_namespaces
from dandelion_p2p.net.dht.records import NamespaceRegistration

SERVICE_MODULES: tuple[str, ...] = (
    "dandelion_p2p.node_metrics",
    "dandelion_p2p.dataset.service",
    "dandelion_p2p.webui.service",
    "dandelion_p2p.sync.service",
)
"""Started in this order; each may rely on handlers registered by those before it."""

DHT_NAMESPACES: tuple[NamespaceRegistration, ...] = (
    register_averaging_namespace,
    register_proof_namespace,
    register_dataset_namespaces,
)
"""Every feature's DHT namespaces, for every ``SwarmNode``: a DHT server stores averaging
announcements, equivocation proofs, dataset holders and run configs whether or not it takes
part itself."""


def create_services(ctx: DaemonContext) -> list[Service]:
    services: list[Service] = []
    for module_name in SERVICE_MODULES:
        create: Callable[[DaemonContext], Service | None] = importlib.import_module(
            module_name
        ).create
        service = create(ctx)
        if service is not None:
            services.append(service)
    return services
