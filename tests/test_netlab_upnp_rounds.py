"""A peer behind a real NAT with ``--upnp`` averages as fast as a peer on a public address:
every address it advertises, the data plane's included, is mapped on its router (network
namespaces, the lab's own port-mapping gateway on the router; needs root)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from benchmarks.averaging_cluster import start_cluster
from dandelion_p2p.netlab import Host, NetLab
from tests.test_netlab_swarm import start_gateway

pytestmark = [pytest.mark.netlab, pytest.mark.slow]

SIZE = 4_000_000
ROUNDS = 4
COMMON = ["--gather", "1.0", "--chunk-elements", "262144", "--chunk-timeout", "10"]


def round_seconds(
    seed: Host, other: Host, workdir: Path, other_args: list[str]
) -> tuple[list[float], str]:
    """Seconds of each round after the first (which also opens the connections), as the
    second peer (on ``other``) timed them, averaging with a public peer on ``seed``; and
    that peer's log."""
    cluster = start_cluster(
        2, workdir, size=SIZE, rounds=ROUNDS, launchers=[seed, other], ips=[seed.ip, "0.0.0.0"],
        extra=COMMON, per_peer={1: other_args},
    )
    try:
        assert "/p2p-circuit/" not in cluster.peers[1].addr, cluster.peers[1].addr
        cluster.go()
        cluster.wait(120)
        entries = cluster.peers[1].results()
    finally:
        cluster.stop()
    assert [e["report"]["complete"] for e in entries] == [True] * ROUNDS, entries
    return [float(e["seconds"]) for e in entries[1:]], cluster.peers[1].log.read_text()


def test_upnp_peer_rounds_take_as_long_as_a_direct_peers(netlab: NetLab, tmp_path: Path) -> None:
    seed = netlab.add_public_host("seed")
    public = netlab.add_public_host("direct")
    nat = netlab.add_nat("home")
    start_gateway(nat, tmp_path / "gw.json")

    direct, _ = round_seconds(seed, public, tmp_path / "direct", ["--reachability", "public"])
    upnp, log = round_seconds(
        seed, nat.host, tmp_path / "upnp", ["--reachability", "auto", "--upnp"]
    )
    direct_median, upnp_median = statistics.median(direct), statistics.median(upnp)
    print(f"round seconds, direct peer: {[round(s, 2) for s in direct]} "
          f"(median {direct_median:.2f}); --upnp peer behind NAT: "
          f"{[round(s, 2) for s in upnp]} (median {upnp_median:.2f}); "
          f"ratio {upnp_median / direct_median:.2f}")
    # Both of the peer's ports were mapped: the libp2p one and the data plane's.
    assert f"data plane reachable at {nat.wan_ip}:" in log, log[-3000:]
    # Within 20 % of the direct peer's rounds (plus 50 ms for a shared machine's noise on
    # rounds of about 0.25 s); a round took 5 s more while the data port was advertised unmapped.
    assert upnp_median <= 1.2 * direct_median + 0.05
