"""Where the demo runs its peers: behind real NATs, with their web UIs forwarded out."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from dandelion_p2p.demo_nat import DemoNetwork, Forwarder
from dandelion_p2p.netlab import NetLab, netlab_unavailable_reason

# A one-page HTTP server on the namespace's own 127.0.0.1, as a daemon's web UI listens.
SERVER = """
import http.server, sys
class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("inside " + self.headers["Host"]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Page)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.mark.netlab
def test_a_web_ui_inside_a_nat_namespace_is_reached_through_the_forwarder(
    netlab: NetLab,
) -> None:
    host = netlab.add_nat("alice").host
    server = host.popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    # The port is the namespace's: nothing answers on it here.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    forwarder = Forwarder(host.netns, port)
    try:
        for _ in range(3):  # one upstream connection per client connection
            with urllib.request.urlopen(f"http://127.0.0.1:{forwarder.port}/", timeout=10) as r:
                assert r.read().decode() == f"inside 127.0.0.1:{forwarder.port}"
    finally:
        forwarder.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", forwarder.port), timeout=1).close()
        except OSError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the forwarder still accepts connections after close")


def test_simulated_network_keeps_everything_on_loopback() -> None:
    net, why = DemoNetwork.open("simulated")
    try:
        assert not net.real and why == "asked for"
        assert net.relay_listen() == "/ip4/127.0.0.1/tcp/0"
        assert net.peer_args() == ["--reachability", "private", "--listen",
                                   "/ip4/127.0.0.1/tcp/0"]
        net.add_peer("alice")
        assert net.browser_url("alice", "http://127.0.0.1:4080/") == "http://127.0.0.1:4080/"
        assert "simulated" in net.describe("alice")
    finally:
        net.close()


@pytest.mark.netlab
def test_real_network_puts_the_relay_in_public_and_the_peers_behind_nats() -> None:
    if netlab_unavailable_reason() is not None:
        pytest.skip(f"network lab unavailable: {netlab_unavailable_reason()}")
    net, why = DemoNetwork.open("real")
    try:
        assert net.real and "namespaces" in why
        net.add_peer("alice")
        relay_ip = net.hosts["relay"].ip
        assert net.relay_listen() == f"/ip4/{relay_ip}/tcp/4001"
        assert "--reachability" not in net.peer_args()  # found out, not told
        assert "behind a NAT router" in net.describe("alice")
        # The peer's host reaches the relay's address, through its router.
        done = net.hosts["alice"].run(["ip", "route", "get", relay_ip])
        assert "via" in done.stdout
    finally:
        net.close()
