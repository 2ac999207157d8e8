"""What an operator reads: ``status`` names the relay of a relayed connection on both ends, and
``--log-level debug`` shows py-libp2p's logs without multiaddr's flood (real hosts, loopback)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

from dandelion_p2p.net import addrs as maddrs
from dandelion_p2p.net.node import SwarmNode
from tests.daemon_proc import start_daemon
from tests.swarm import public_settings, running_node


async def _private_peer(stack: AsyncExitStack, relay: SwarmNode) -> SwarmNode:
    settings = public_settings(
        bootstrap=(relay.full_addrs()[0],), reachability="private", relays_wanted=1
    )
    return await stack.enter_async_context(running_node(settings))


def _relayed_addrs(node: SwarmNode, peer: SwarmNode) -> list[str]:
    (entry,) = [p for p in node.connected_peers() if p["peer_id"] == peer.peer_id.to_base58()]
    return [a for a in entry["addrs"] if maddrs.is_relayed(a)]


async def test_both_ends_of_a_relayed_connection_name_the_relay() -> None:
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(running_node(public_settings(relay=True)))
        dialer = await _private_peer(stack, relay)
        accepter = await _private_peer(stack, relay)
        await dialer.send_note(accepter.peer_id, "via the relay")
        expected = (
            f"/p2p/{relay.peer_id.to_base58()}/p2p-circuit/p2p/"
        )
        # Read at once: DCUtR may upgrade the connection to a direct one later.
        on_accepter = _relayed_addrs(accepter, dialer)
        on_dialer = _relayed_addrs(dialer, accepter)
        assert on_accepter == [expected + dialer.peer_id.to_base58()]
        assert on_dialer and all(
            a.endswith(expected + accepter.peer_id.to_base58()) for a in on_dialer
        ), on_dialer


def test_debug_log_level_shows_libp2p_and_not_multiaddr(tmp_path: Path) -> None:
    daemon = start_daemon(
        "daemon", ["--listen", "/ip4/127.0.0.1/tcp/0", "--log-level", "debug"], tmp_path / "d"
    )
    try:
        daemon.call("status")
    finally:
        code, _ = daemon.stop()
    assert code == 0
    lines = daemon.stderr_path.read_text().splitlines()
    libp2p_lines = [line for line in lines if " libp2p." in line]
    multiaddr_lines = [line for line in lines if " multiaddr." in line]
    print(f"debug log: {len(lines)} lines, {len(libp2p_lines)} from libp2p, "
          f"{len(multiaddr_lines)} from multiaddr")
    assert libp2p_lines, "py-libp2p's logs are missing at debug level"
    assert not multiaddr_lines


def test_info_log_level_keeps_libp2p_quiet(tmp_path: Path) -> None:
    daemon = start_daemon("daemon", ["--listen", "/ip4/127.0.0.1/tcp/0"], tmp_path / "d")
    code, _ = daemon.stop()
    assert code == 0
    lines = daemon.stderr_path.read_text().splitlines()
    assert any(" dandelion_p2p." in line for line in lines)
    assert not [line for line in lines if " libp2p." in line or " multiaddr." in line]
