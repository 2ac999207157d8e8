"""An averaging round between two NAT'd peers whose relay is killed mid-round finishes
through the other relay (network lab, needs root)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.averaging_cluster import start_cluster
from benchmarks.averaging_peer import peer_vector
from dandelion_p2p.netlab import Host, NetLab
from tests.daemon_proc import DaemonProcess, start_lab_relay
from tests.test_netlab_faults import block_between

pytestmark = [pytest.mark.netlab, pytest.mark.slow]

SIZE = 4_000_000
LINK_MBIT = 8.0
MID_ROUND = 2_000_000


def sent_bytes(host: Host) -> int:
    """Bytes ``host`` has sent on its links so far (all but loopback)."""
    total = 0
    for line in host.run(["cat", "/proc/net/dev"]).stdout.splitlines()[2:]:
        name, counters = line.split(":", 1)
        if name.strip() != "lo":
            total += int(counters.split()[8])
    return total


def wait_for(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout} s")


def test_a_round_whose_relay_is_killed_finishes_through_the_other_relay(
    netlab: NetLab, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    h1, h2 = netlab.add_public_host("r1"), netlab.add_public_host("r2")
    nat_a = netlab.add_nat("a", up_mbit=LINK_MBIT, down_mbit=LINK_MBIT)
    nat_b = netlab.add_nat("b", up_mbit=LINK_MBIT, down_mbit=LINK_MBIT)
    # No direct path (and no hole punch): everything between the peers goes through a relay.
    block_between(nat_a, nat_b.wan_ip)
    block_between(nat_b, nat_a.wan_ip)
    r1, r1_addr = start_lab_relay(h1, tmp_path / "r1", daemons)
    r2, _ = start_lab_relay(h2, tmp_path / "r2", daemons, bootstrap=r1_addr)
    relays = {r1.peer_id: (r1, h1), r2.peer_id: (r2, h2)}
    cluster = start_cluster(
        2, tmp_path / "peers", size=SIZE, rounds=1,
        launchers=[nat_a.host, nat_b.host], ips=[nat_a.host.ip, nat_b.host.ip],
        bootstrap=r1_addr,
        extra=["--reachability", "auto", "--save", "--chunk-timeout", "20", "--gather", "2.0",
               "--chunk-elements", "262144", "--mark-mid-round", str(MID_ROUND)],
    )
    try:
        # Each peer holds a reservation on both relays before the round starts.
        wait_for("reservations on both relays", lambda: all(
            all(f"reserved a slot on relay {r}" in p.log.read_text() for r in relays)
            for p in cluster.peers
        ), 60)
        cluster.go()
        wait_for("chunks of round 1", lambda: "mid-round 1" in cluster.peers[0].log.read_text(),
                 60)
        before = {r: sent_bytes(h) for r, (_, h) in relays.items()}
        time.sleep(0.5)
        carried = {r: sent_bytes(h) - before[r] for r, (_, h) in relays.items()}
        dead = max(carried, key=lambda r: carried[r])
        relays[dead][0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        print(f"\nbytes sent by each relay in 0.5 s: {carried}; killed {dead[-8:]}")
        cluster.wait(180)
        print(f"round ended {time.monotonic() - killed_at:.1f} s after the kill")
        logs = [p.log.read_text() for p in cluster.peers]
        for index, log in enumerate(logs):
            for line in log.splitlines():
                if "channel to" in line and ("lost" in line or "no channel" in line):
                    print(f"peer {index}: {line[11:23]} {line.split(': ', 1)[-1][:160]}")
        expected = (peer_vector(0, 1, SIZE).astype(np.float64) + peer_vector(1, 1, SIZE)) / 2
        for peer in cluster.peers:
            (entry,) = peer.results()
            report = entry["report"]
            print(f"peer {peer.index}: round took {entry['seconds']:.1f} s, averaged "
                  f"{report['fraction_averaged']:.3f}")
            assert report["complete"] is True, report
            np.testing.assert_allclose(
                np.load(f"{peer.out}.round1.npy"), expected, rtol=1e-6, atol=1e-6
            )
        # The round lost its channel and finished over a new one.
        assert any("frames sent again on a new one" in log for log in logs), logs[0][-3000:]
    finally:
        cluster.stop()
