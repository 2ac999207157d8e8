"""Two peers behind different NATs average through a relay (network lab, needs root)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.averaging_cluster import start_cluster
from benchmarks.averaging_peer import peer_vector
from dandelion_p2p.netlab import NetLab
from tests.daemon_proc import start_daemon

pytestmark = pytest.mark.netlab

SIZE = 2_000_000


def test_two_nat_peers_complete_a_round_through_the_relay(
    netlab: NetLab, tmp_path: Path
) -> None:
    public = netlab.add_public_host("relay")
    nat_a, nat_b = netlab.add_nat("a"), netlab.add_nat("b")
    relay = start_daemon("daemon", ["--relay", "--listen", f"/ip4/{public.ip}/tcp/4001"],
                         tmp_path / "relay", launcher=public)
    try:
        boot = f"/ip4/{public.ip}/tcp/4001/p2p/{relay.peer_id}"
        cluster = start_cluster(
            2, tmp_path / "peers", size=SIZE, rounds=1, weights=[1, 3],
            launchers=[nat_a.host, nat_b.host], ips=[nat_a.host.ip, nat_b.host.ip],
            bootstrap=boot,
            extra=["--reachability", "auto", "--save", "--chunk-timeout", "10",
                   "--gather", "2.0", "--chunk-elements", "262144"],
        )
        try:
            for peer in cluster.peers:
                assert "/p2p-circuit/" in peer.addr, "the peer should be reachable via the relay"
            cluster.go()
            cluster.wait(90)
            expected = (peer_vector(0, 1, SIZE).astype(np.float64)
                        + 3 * peer_vector(1, 1, SIZE)) / 4
            for peer in cluster.peers:
                (entry,) = peer.results()
                report = entry["report"]
                assert report["complete"] is True, report
                np.testing.assert_allclose(
                    np.load(f"{peer.out}.round1.npy"), expected, rtol=1e-6, atol=1e-6
                )
        finally:
            cluster.stop()
    finally:
        relay.stop()
