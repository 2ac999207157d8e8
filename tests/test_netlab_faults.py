"""Real faults between peers behind real NATs: a hung relay, a black-holed relay, a late
hole punch in the middle of an averaging round (network lab, needs root)."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from benchmarks.averaging_cluster import start_cluster
from benchmarks.averaging_peer import peer_vector
from dandelion_p2p.net.liveness_core import LivenessSettings
from dandelion_p2p.netlab import Host, NatRouter, NetLab
from tests.daemon_proc import (
    DaemonProcess,
    launch_daemon,
    start_daemon,
    start_daemons,
    start_lab_relay,
)

pytestmark = [pytest.mark.netlab, pytest.mark.slow]

# The bound for traffic to flow again through the other relay. Detection takes at
# most LivenessSettings().bound (16 s); a dial through a relay that answers and a note's
# round trip take the rest.
RECOVERY_BOUND = 30.0


def block_between(router: NatRouter, other_wan_ip: str) -> None:
    """Drop everything the router would forward to ``other_wan_ip``: no direct path (and
    no hole punch) between the two NATs; the relays stay reachable."""
    router.nft(
        "table inet nodirect {\n"
        "  chain forward {\n"
        "    type filter hook forward priority -10; policy accept;\n"
        f"    ip daddr {other_wan_ip} drop\n"
        f"    ip saddr {other_wan_ip} drop\n"
        "  }\n"
        "}\n"
    )


def unblock(router: NatRouter) -> None:
    router.nft("delete table inet nodirect\n")


def count_direct(router: NatRouter, other_wan_ip: str) -> None:
    router.nft(
        "table inet directcount {\n"
        "  chain forward {\n"
        "    type filter hook forward priority -5; policy accept;\n"
        f"    ip daddr {other_wan_ip} counter\n"
        "  }\n"
        "}\n"
    )


def direct_bytes(router: NatRouter) -> int:
    """Bytes the router forwarded straight to the other NAT since ``count_direct``."""
    listing = router.nft("list table inet directcount\n")
    return int(listing.split(" bytes ")[1].split()[0])


def black_hole(host: Host) -> None:
    """Silently drop every packet in and out of ``host`` (its process keeps running)."""
    host.run(["nft", "-f", "-"], input=(
        "table inet blackhole {\n"
        "  chain in { type filter hook input priority -10; policy drop; }\n"
        "  chain out { type filter hook output priority -10; policy drop; }\n"
        "}\n"
    ))


@dataclass
class RelayedPair:
    relays: dict[str, DaemonProcess]
    relay_hosts: dict[str, Host]
    a: DaemonProcess
    b: DaemonProcess

    def relay_between(self) -> str:
        """The peer id of the relay that carries a's connection to b ("" if none)."""
        for peer in self.a.call("status")["connected_peers"]:
            if peer["peer_id"] == self.b.peer_id:
                for relay_id in self.relays:
                    if any(relay_id in addr for addr in peer["addrs"]):
                        return relay_id
        return ""


def reserved(d: DaemonProcess) -> set[str]:
    return {r["relay"] for r in d.call("status")["relay_reservations"]}


def wait_for(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout} s")


def start_relayed_pair(netlab: NetLab, tmp_path: Path,
                       daemons: list[DaemonProcess]) -> RelayedPair:
    """Two relays and two peers behind drop-NATs with no direct path between them, each
    peer holding reservations on both relays, and a note exchanged (so a relayed
    connection between the peers is up)."""
    h1, h2 = netlab.add_public_host("r1"), netlab.add_public_host("r2")
    nat_a, nat_b = netlab.add_nat("a"), netlab.add_nat("b")
    block_between(nat_a, nat_b.wan_ip)
    block_between(nat_b, nat_a.wan_ip)
    r1, r1_addr = start_lab_relay(h1, tmp_path / "r1", daemons)
    r2, r2_addr = start_lab_relay(h2, tmp_path / "r2", daemons, bootstrap=r1_addr)
    a, b = start_daemons([
        launch_daemon("join", [r1_addr, r2_addr], tmp_path / "a", launcher=nat_a.host),
        launch_daemon("join", [r1_addr, r2_addr], tmp_path / "b", launcher=nat_b.host),
    ])
    daemons.extend((a, b))
    both = {r1.peer_id, r2.peer_id}
    wait_for("reservations on both relays", lambda: reserved(a) == both == reserved(b), 30)
    assert a.call("send", {"peer": b.peer_id, "text": "before"})["receipt"] == (
        "received: before"
    )
    pair = RelayedPair({r1.peer_id: r1, r2.peer_id: r2}, {r1.peer_id: h1, r2.peer_id: h2},
                       a, b)
    wait_for("a relayed connection", lambda: pair.relay_between() != "", 10)
    return pair


def time_to_recover(pair: RelayedPair, dead_relay: str, limit: float = 90.0) -> float:
    """Send notes from a to b until one arrives; seconds from now to that receipt."""
    start = time.monotonic()
    attempt = 0
    while time.monotonic() - start < limit:
        attempt += 1
        try:
            reply = pair.a.call("send", {"peer": pair.b.peer_id, "text": f"after {attempt}"},
                                timeout=45)
        except Exception as exc:
            print(f"  {time.monotonic() - start:5.1f} s: note {attempt} failed: {exc}"[:300])
            time.sleep(0.5)
            continue
        assert reply["receipt"] == f"received: after {attempt}"
        return time.monotonic() - start
    raise AssertionError(f"no note went through within {limit} s:\n{pair.a.logs()[-4000:]}")


def check_moved_off(pair: RelayedPair, dead_relay: str) -> None:
    (alive,) = set(pair.relays) - {dead_relay}
    assert pair.relay_between() == alive
    wait_for("the dead relay's reservation dropped",
             lambda: dead_relay not in reserved(pair.a) and dead_relay not in reserved(pair.b),
             LivenessSettings().bound + 5)
    assert pair.b.call("send", {"peer": pair.a.peer_id, "text": "back"})["receipt"] == (
        "received: back"
    )


def test_a_frozen_relay_is_noticed_and_traffic_moves_to_the_other_relay(
    netlab: NetLab, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    pair = start_relayed_pair(netlab, tmp_path, daemons)
    dead = pair.relay_between()
    frozen = pair.relays[dead]
    frozen.send_signal(signal.SIGSTOP)
    try:
        took = time_to_recover(pair, dead)
        print(f"\nfrozen relay: notes flow again after {took:.1f} s")
        assert took <= RECOVERY_BOUND, pair.a.logs()[-4000:]
        check_moved_off(pair, dead)
    finally:
        frozen.send_signal(signal.SIGCONT)


def test_a_black_holed_relay_is_noticed_and_traffic_moves_to_the_other_relay(
    netlab: NetLab, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    pair = start_relayed_pair(netlab, tmp_path, daemons)
    dead = pair.relay_between()
    black_hole(pair.relay_hosts[dead])
    took = time_to_recover(pair, dead)
    print(f"\nblack-holed relay: notes flow again after {took:.1f} s")
    assert took <= RECOVERY_BOUND, pair.a.logs()[-4000:]
    check_moved_off(pair, dead)


SIZE = 4_000_000
LINK_MBIT = 2.0
PUNCH_BLOCKED_FOR = 21.0


def test_a_hole_punch_landing_mid_round_does_not_cut_the_round(
    netlab: NetLab, tmp_path: Path
) -> None:
    public = netlab.add_public_host("relay")
    nat_a = netlab.add_nat("a", up_mbit=LINK_MBIT, down_mbit=LINK_MBIT)
    nat_b = netlab.add_nat("b", up_mbit=LINK_MBIT, down_mbit=LINK_MBIT)
    block_between(nat_a, nat_b.wan_ip)
    block_between(nat_b, nat_a.wan_ip)
    relay = start_daemon("daemon", ["--relay", "--listen", f"/ip4/{public.ip}/tcp/4001"],
                         tmp_path / "relay", launcher=public)
    try:
        boot = f"/ip4/{public.ip}/tcp/4001/p2p/{relay.peer_id}"
        cluster = start_cluster(
            2, tmp_path / "peers", size=SIZE, rounds=1, weights=[1, 3],
            launchers=[nat_a.host, nat_b.host], ips=[nat_a.host.ip, nat_b.host.ip],
            bootstrap=boot,
            extra=["--reachability", "auto", "--save", "--chunk-timeout", "60",
                   "--gather", "2.0", "--chunk-elements", "262144"],
        )
        try:
            cluster.go()
            # The relayed connection is made when the round starts; every punch fails
            # until the block goes, so the upgrade lands after py-libp2p's 20 s grace, when
            # py-libp2p would close the relayed connection at once.
            time.sleep(PUNCH_BLOCKED_FOR)
            assert all(p.proc.poll() is None for p in cluster.peers), "round ended too early:\n" + (
                "\n".join(p.log.read_text()[-2000:] + str(p.results()) for p in cluster.peers)
            )
            unblock(nat_a)
            unblock(nat_b)
            count_direct(nat_a, nat_b.wan_ip)
            print(f"\npunch unblocked at {time.strftime('%H:%M:%S')}")
            cluster.wait(240)
            expected = (peer_vector(0, 1, SIZE).astype(np.float64)
                        + 3 * peer_vector(1, 1, SIZE)) / 4
            logs = [p.log.read_text() for p in cluster.peers]
            for index, log in enumerate(logs):
                for line in log.splitlines():
                    if "connection to" in line and ("replaced" in line or "silent" in line):
                        print(f"peer {index}: {line[:24]} {line.split(': ', 1)[-1][-90:]}")
            results = [peer.results() for peer in cluster.peers]
            direct = direct_bytes(nat_a)
            print(f"bytes from a straight to b after the unblock: {direct}")
            for peer, (entry,) in zip(cluster.peers, results, strict=True):
                print(f"peer {peer.index}: round took {entry['seconds']:.1f} s, averaged "
                      f"{entry['report']['fraction_averaged']:.3f}")
            # The punch landed during the round (the streams already open stay on the draining
            # relayed connection, so little goes direct before the round ends).
            assert direct > 0
            assert any("replaced; closing it once its" in log for log in logs), (
                "no hole punch landed during the round:\n" + logs[0][-3000:]
            )
            for peer, (entry,) in zip(cluster.peers, results, strict=True):
                assert entry["seconds"] > PUNCH_BLOCKED_FOR
                assert entry["report"]["complete"] is True, entry["report"]
                np.testing.assert_allclose(
                    np.load(f"{peer.out}.round1.npy"), expected, rtol=1e-6, atol=1e-6
                )
        finally:
            cluster.stop()
    finally:
        relay.stop()
