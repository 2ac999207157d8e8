"""A peer behind a real NAT restarted while its only bootstrap peer is dead: it finds the swarm
again through the relays and DHT servers it remembers (network namespaces, needs root)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from dandelion_p2p.net.swarm_memory import MEMORY_FILENAME
from dandelion_p2p.netlab import NetLab
from tests.daemon_proc import DaemonProcess, launch_daemon, start_daemon, start_lab_relay

pytestmark = pytest.mark.netlab


@pytest.mark.slow
def test_restart_with_a_dead_bootstrap_finds_the_swarm_it_remembers(
    netlab: NetLab, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    first_host, second_host = netlab.add_public_host("r1"), netlab.add_public_host("r2")
    nat = netlab.add_nat("a")
    lonely_nat = netlab.add_nat("c")
    first, first_addr = start_lab_relay(first_host, tmp_path / "r1", daemons)
    second, _ = start_lab_relay(second_host, tmp_path / "r2", daemons, bootstrap=first_addr)

    # The peer knows only the first relay; it learns the second from the DHT.
    peer = start_daemon("join", [first_addr], tmp_path / "a", launcher=nat.host)
    daemons.append(peer)
    deadline = time.monotonic() + 30
    held: set[str] = set()
    while time.monotonic() < deadline and len(held) < 2:
        held = {r["relay"] for r in peer.call("status")["relay_reservations"]}
        time.sleep(0.2)
    assert held == {first.peer_id, second.peer_id}, peer.logs()[-3000:]
    code, _ = peer.stop()
    assert code == 0, peer.logs()
    remembered = json.loads((tmp_path / "a" / MEMORY_FILENAME).read_text())["peers"]
    assert len(remembered) >= 2

    first.stop(signal.SIGKILL)
    started = time.monotonic()
    restarted = launch_daemon("join", [first_addr], tmp_path / "a", launcher=nat.host)
    daemons.append(restarted)
    # A peer with no memory and the same dead bootstrap: no "ready", a warning, retries.
    lonely = launch_daemon("join", [first_addr], tmp_path / "c", launcher=lonely_nat.host)
    daemons.append(lonely)
    restarted.wait_ready(30)
    found_in = time.monotonic() - started
    print(f"restart with a dead bootstrap: ready after {found_in:.1f} s")
    status = restarted.call("status")
    assert status["connected_peers"], restarted.logs()[-3000:]
    assert status["routing_table_size"] >= 1
    deadline = time.monotonic() + 30 - found_in
    while time.monotonic() < deadline and not status["relay_reservations"]:
        time.sleep(0.2)
        status = restarted.call("status")
    assert [r["relay"] for r in status["relay_reservations"]] == [second.peer_id]
    print(f"restart with a dead bootstrap: reserved on the other relay after "
          f"{time.monotonic() - started:.1f} s")

    deadline = started + 40
    while time.monotonic() < deadline and warnings(lonely) < 2:
        time.sleep(0.5)
    assert lonely.proc.poll() is None
    assert warnings(lonely) >= 2, lonely.logs()
    assert "rejoining through bootstrap peers" in lonely.logs()
    assert "ready" not in lonely.stdout_path.read_text().splitlines()


def warnings(daemon: DaemonProcess) -> int:
    return daemon.stderr_path.read_text().count("not connected to any peer")
