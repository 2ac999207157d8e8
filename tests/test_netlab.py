"""The network lab builds real, isolated topologies: reachability, NAT, filtering, bandwidth."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from typing import Any

import pytest

from dandelion_p2p.netlab import Host, NetLab, netlab_available

pytestmark = pytest.mark.netlab

PORT = 5000

# One small script plays both ends: "serve" accepts one connection, reads to EOF, answers with
# N bytes and reports the peer's address; "connect" sends N bytes and reads the answer. Both
# time the data they receive, from first to last byte.
PEER = r"""
import json, socket, sys, time

def drain(sock):
    n, first, last = 0, None, None
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return n, (last - first) if first is not None else 0.0
        last = time.monotonic()
        first = first if first is not None else last
        n += len(chunk)

mode, port, nbytes, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
if mode == "serve":
    srv = socket.create_server(("0.0.0.0", port))
    srv.settimeout(timeout)
    print("READY", flush=True)
    conn, peer = srv.accept()
    conn.settimeout(timeout)
    received, seconds = drain(conn)
    conn.sendall(b"x" * nbytes)
    conn.close()
    print(json.dumps({"peer": peer[0], "received": received, "seconds": seconds}), flush=True)
else:
    try:
        conn = socket.create_connection((sys.argv[5], port), timeout=timeout)
        conn.sendall(b"y" * nbytes)
        conn.shutdown(socket.SHUT_WR)
        received, seconds = drain(conn)
        print(json.dumps({"ok": True, "received": received, "seconds": seconds}))
    except OSError as exc:
        print(json.dumps({"ok": False, "error": type(exc).__name__}))
"""


def wait_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output within {timeout}s")
    return proc.stdout.readline().strip()


def serve(host: Host, reply_bytes: int = 4, timeout: float = 10.0) -> subprocess.Popen[str]:
    proc = host.popen([sys.executable, "-c", PEER, "serve", str(PORT), str(reply_bytes),
                       str(timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_line(proc, 10.0) == "READY"
    return proc


def served(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def connect(host: Host, ip: str, send_bytes: int = 4, timeout: float = 10.0) -> dict[str, Any]:
    done = host.run([sys.executable, "-c", PEER, "connect", str(PORT), str(send_bytes),
                     str(timeout), ip], timeout=timeout + 10)
    result: dict[str, Any] = json.loads(done.stdout.strip())
    return result


def test_public_host_reaches_public_host(netlab: NetLab) -> None:
    a = netlab.add_public_host("a")
    b = netlab.add_public_host("b")
    server = serve(a, reply_bytes=3)
    client = connect(b, a.ip, send_bytes=5)
    assert client["ok"] and client["received"] == 3
    result = served(server)
    assert result["peer"] == b.ip
    assert result["received"] == 5


def test_private_host_reaches_public_host_through_nat(netlab: NetLab) -> None:
    server_host = netlab.add_public_host("server")
    nat = netlab.add_nat("home")
    server = serve(server_host)
    client = connect(nat.host, server_host.ip)
    assert client["ok"] and client["received"] == 4
    # The public side sees the router's WAN address, never the private one.
    assert served(server)["peer"] == nat.wan_ip
    assert nat.host.ip != nat.wan_ip


@pytest.mark.parametrize("answer_with_rst", [False, True], ids=["drop", "rst"])
def test_public_host_cannot_reach_private_host(netlab: NetLab, answer_with_rst: bool) -> None:
    outsider = netlab.add_public_host("outsider")
    nat = netlab.add_nat("home", answer_with_rst=answer_with_rst)
    # Route the private subnet via the router, as a neighbour on the same link could: only
    # the router's filter, not a missing route, can stop the connection now.
    outsider.run(["ip", "route", "add", nat.lan_net, "via", nat.wan_ip])
    server = serve(nat.host, timeout=5.0)
    to_private = connect(outsider, nat.host.ip, timeout=1.0)
    assert to_private == {"ok": False, "error": "TimeoutError"}

    start = time.monotonic()
    to_router = connect(outsider, nat.wan_ip, timeout=1.0)
    elapsed = time.monotonic() - start
    if answer_with_rst:
        assert to_router == {"ok": False, "error": "ConnectionRefusedError"}
        assert elapsed < 1.0
    else:
        assert to_router == {"ok": False, "error": "TimeoutError"}
    server.kill()
    server.wait()


def measure_mbit(result: dict[str, Any]) -> float:
    assert result["received"] == TRANSFER
    return float(result["received"] * 8 / max(result["seconds"], 1e-6) / 1e6)


TRANSFER = 512 * 1024
CAP_MBIT = 8.0


def test_bandwidth_caps_limit_throughput(netlab: NetLab) -> None:
    sink = netlab.add_public_host("sink")
    fast = netlab.add_public_host("fast")
    slow = netlab.add_public_host("slow", up_mbit=CAP_MBIT)
    nat = netlab.add_nat("home", down_mbit=CAP_MBIT)

    server = serve(sink)
    assert connect(fast, sink.ip, send_bytes=TRANSFER)["ok"]
    uncapped = measure_mbit(served(server))

    server = serve(sink)
    assert connect(slow, sink.ip, send_bytes=TRANSFER)["ok"]
    uplink = measure_mbit(served(server))

    server = serve(sink, reply_bytes=TRANSFER)
    downlink = measure_mbit(connect(nat.host, sink.ip))
    served(server)

    # The token bucket lets its burst through at line rate, so a short transfer measures a
    # little above the cap; the uncapped path is orders of magnitude faster.
    print(f"uncapped {uncapped:.0f}, uplink {uplink:.2f}, downlink {downlink:.2f} Mbit/s")
    for measured in (uplink, downlink):
        assert 0.5 * CAP_MBIT < measured < 1.35 * CAP_MBIT, (uplink, downlink)
    assert uncapped > 5 * CAP_MBIT


def test_teardown_removes_namespaces_and_processes() -> None:
    if not netlab_available():
        pytest.skip("network lab unavailable")
    with NetLab() as lab:
        nat = lab.add_nat("home")
        sleeper = nat.host.popen(["sleep", "60"])
        names = [lab.internet, nat.netns, nat.host.netns]
    assert sleeper.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed.split() for name in names)
