"""The data plane behind a port-mapped NAT (``--upnp``): map its port too, or advertise none.

The node's port mapping (``net.portmapping``) forwards the libp2p port only. A data plane that
then told peers "dial me at <external IP>:<data port>" sent every opener into a connect that
could only time out (``SessionSettings.connect_timeout``, 5 s) before the channel fell back to
the libp2p stream: a 5 s stall per channel, so per averaging round. Here the data port gets a
mapping of its own on the same gateway (by the method that mapped the node's port), and the
data plane offers a direct endpoint only while both mappings hold and the node's is
confirmed by dial-back; otherwise it offers none and its channels take the libp2p stream.

The data port's mapping is not dialed back itself: the dial-back protocol speaks libp2p, and
the gateway that forwards the node's confirmed port forwards this one the same way.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

import trio

from dandelion_p2p.dataplane.messages import format_endpoint
from dandelion_p2p.errors import DandelionError
from dandelion_p2p.net.portmap.client import PortMapping, keep_mapped

if TYPE_CHECKING:
    from dandelion_p2p.dataplane.service import DataPlane
    from dandelion_p2p.net.node import SwarmNode

log = logging.getLogger(__name__)

RECHECK_INTERVAL = 1.0
"""Seconds between looks at whether the node's own mapping still holds (it can be lost and
found again while we run)."""


class DataPortForwarding:
    def __init__(self, node: SwarmNode, dataplane: DataPlane) -> None:
        self.node = node
        self.dataplane = dataplane
        self.mapping: PortMapping | None = None

    def _on_change(self, mapping: PortMapping | None) -> None:
        self.mapping = mapping
        self.apply()

    def endpoint(self) -> str | None:
        """The endpoint peers can dial now, or None."""
        m = self.mapping
        if m is None or m.external_ip is None or not self.node.mapped_addrs:
            return None
        return format_endpoint(m.external_ip, m.external_port)

    def apply(self) -> None:
        endpoint = self.endpoint()
        offered = self.dataplane.advertise if self.dataplane.reachable else None
        if endpoint == offered:
            return
        if endpoint is None:
            self.dataplane.reachable = False
            log.info("data plane: no mapped port; channels go over libp2p streams")
        else:
            self.dataplane.advertise = endpoint
            self.dataplane.reachable = True
            log.info("data plane reachable at %s (port mapping)", endpoint)

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]
    ) -> None:
        forwarding = self.node.port_forwarding
        port = self.dataplane.bound_port
        if forwarding is None or port is None:
            task_status.started()
            return
        # Never advertise the unmapped port, even for a moment.
        self.dataplane.reachable = False
        main = forwarding.mapping
        methods = (main.method,) if main is not None else ()
        if not methods:
            log.warning("data plane: the router mapped nothing; channels go over libp2p streams")
            task_status.started()
            return
        async with trio.open_nursery() as nursery:
            try:
                self.mapping = await nursery.start(
                    partial(keep_mapped, port, methods=methods, on_change=self._on_change)
                )
            except DandelionError as exc:
                log.warning(
                    "the router did not map the data port %d: %s; channels go over libp2p "
                    "streams", port, exc,
                )
                task_status.started()
                return
            self.apply()
            task_status.started()
            while True:
                await trio.sleep(RECHECK_INTERVAL)
                self.apply()

    def status(self) -> dict[str, object] | None:
        if self.mapping is None:
            return None
        return {
            "method": self.mapping.method,
            "external": f"{self.mapping.external_ip}:{self.mapping.external_port}",
            "internal_port": self.mapping.internal_port,
            "advertised": self.dataplane.advertise if self.dataplane.reachable else None,
        }
