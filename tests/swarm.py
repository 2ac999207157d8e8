"""Helpers for tests that run real swarm nodes on loopback in the test's own trio loop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace

import trio

from dandelion_p2p.identity import Identity
from dandelion_p2p.net.node import NodeSettings, SwarmNode
from dandelion_p2p.services import DHT_NAMESPACES

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def public_settings(**overrides: object) -> NodeSettings:
    base = NodeSettings(listen=LOOPBACK, reachability="public", dial_timeout=5.0,
                        request_timeout=5.0)
    return replace(base, **overrides)  # type: ignore[arg-type]


@asynccontextmanager
async def running_node(settings: NodeSettings) -> AsyncIterator[SwarmNode]:
    node = SwarmNode(Identity.generate(), settings, namespaces=DHT_NAMESPACES)
    async with node.running():
        yield node


@asynccontextmanager
async def swarm(count: int, **overrides: object) -> AsyncIterator[list[SwarmNode]]:
    """``count`` public nodes; the first seeds the network and bootstraps the others."""
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_node(public_settings(**overrides)))
        nodes = [first]
        boot = tuple(first.full_addrs()[:1])
        for _ in range(count - 1):
            nodes.append(
                await stack.enter_async_context(
                    running_node(public_settings(bootstrap=boot, **overrides))
                )
            )
        yield nodes


async def serve_node(
    settings: NodeSettings,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[SwarmNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node in its own task until ``stop`` is set, so a test can stop it alone."""
    async with running_node(settings) as node:
        task_status.started(node)
        await stop.wait()
