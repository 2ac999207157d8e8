"""``--upnp``: ask the home router to forward our listen port, and use the mapping once a
public peer confirms it can dial us there.

Only imported when the user turned port mapping on: without it, no UPnP, NAT-PMP or PCP
packet is ever sent.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import TYPE_CHECKING

import trio

from dandelion_p2p.errors import DandelionError
from dandelion_p2p.net import addrs as maddrs
from dandelion_p2p.net.portmap.client import PortMapping, keep_mapped

if TYPE_CHECKING:
    from dandelion_p2p.net.node import SwarmNode

log = logging.getLogger(__name__)


class PortForwarding:
    def __init__(self, node: SwarmNode) -> None:
        self.node = node
        self.mapping: PortMapping | None = None
        self._changes_send, self._changes = trio.open_memory_channel[PortMapping | None](
            math.inf
        )

    def _listen_port(self) -> int | None:
        for addr in self.node.listen_addrs():
            ma = maddrs.parse(addr)
            if ma is None or maddrs.is_loopback(addr):
                continue
            try:
                return int(ma.value_for_protocol("tcp"))
            except Exception:
                continue
        return None

    async def _confirm(self, mapping: PortMapping | None) -> None:
        """Advertise the mapped address only after a public peer dialed us through it; without
        a confirmed mapping the peer is unreachable again and falls back to relays."""
        self.mapping = mapping
        confirmed: list[str] = []
        if mapping is not None and mapping.external_ip is not None:
            addr = f"/ip4/{mapping.external_ip}/tcp/{mapping.external_port}"
            if await self.node.check_reachability([addr]):
                log.info("port mapping %s confirmed by dial-back (%s)", addr, mapping.method)
                confirmed = [addr]
            else:
                log.warning("port mapping %s is not reachable from outside; not advertised", addr)
        self.node.mapped_addrs = confirmed
        self.node.reachable = bool(confirmed)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[name-defined]
        port = self._listen_port()
        if port is None:
            log.warning("no non-loopback TCP listen address to forward; port mapping skipped")
            task_status.started()
            return
        async with trio.open_nursery() as nursery:
            try:
                mapping = await nursery.start(
                    partial(keep_mapped, port, on_change=self._changes_send.send_nowait)
                )
            except DandelionError as exc:
                log.warning("the router did not map port %d: %s; using relays instead", port, exc)
                task_status.started()
                return
            await self._confirm(mapping)
            task_status.started()
            async for changed in self._changes:
                if changed is mapping:
                    continue
                mapping = changed
                await self._confirm(changed)
                await self.node.announce()

    def status(self) -> dict[str, object] | None:
        if self.mapping is None:
            return None
        return {
            "method": self.mapping.method,
            "external": f"{self.mapping.external_ip}:{self.mapping.external_port}",
            "internal_port": self.mapping.internal_port,
            "confirmed": bool(self.node.mapped_addrs),
        }
