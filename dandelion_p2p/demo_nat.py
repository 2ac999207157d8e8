"""Where ``make demo`` runs its three processes: behind real NATs, or on 127.0.0.1.

With root and the network-lab tools (``netlab``), the relay gets a public host of its own and
each peer a private host behind a NAT router (nftables masquerade that drops unsolicited
inbound): the peers find out by dial-back that nobody can reach them, exactly as at home.
Elsewhere every process listens on 127.0.0.1 and the peers are told they are unreachable
(``--reachability private``): they behave as peers behind NAT do, but nothing filters.

A process inside a namespace serves its web UI on that namespace's 127.0.0.1, which the
user's browser cannot reach; a small forwarder here carries each connection into the
namespace, so the login link the demo prints works either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import IO, Any

from dandelion_p2p.netlab import Host, NetLab, netlab_unavailable_reason

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")


def _enter_netns(netns: str) -> None:
    """Move the calling thread (only it) into ``netns``; sockets it opens live there."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {netns}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):
            s.close()


class Forwarder:
    """127.0.0.1:``port`` in this namespace to 127.0.0.1:``target`` inside ``netns``."""

    def __init__(self, netns: str, target: int) -> None:
        self.netns, self.target = netns, target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.ready = threading.Event()
        self.error: OSError | None = None
        threading.Thread(target=self._serve, name=f"forward-{netns}", daemon=True).start()
        self.ready.wait(10)
        if self.error is not None:
            raise self.error

    def _serve(self) -> None:
        try:
            _enter_netns(self.netns)
        except OSError as exc:
            self.error = exc
            return
        finally:
            self.ready.set()
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already shut
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        self.listener.close()


class DemoNetwork:
    """The relay's and the peers' places, the flags that go with them, and the web UI links."""

    def __init__(self, lab: NetLab | None) -> None:
        self.lab = lab
        self.hosts: dict[str, Host] = {}
        self.forwarders: list[Forwarder] = []
        if lab is not None:
            self.hosts["relay"] = lab.add_public_host("relay")

    @property
    def real(self) -> bool:
        return self.lab is not None

    @classmethod
    def open(cls, mode: str) -> tuple[DemoNetwork, str]:
        """``mode`` is real, simulated or auto; returns the network and why it is what it is."""
        reason = netlab_unavailable_reason()
        if mode == "simulated" or (mode == "auto" and reason is not None):
            why = "asked for" if mode == "simulated" else f"no network lab here: {reason}"
            return cls(None), why
        if reason is not None:
            raise SystemExit(f"demo: --nat real needs the network lab: {reason}")
        return cls(NetLab()), "network namespaces with nftables NAT routers"

    def add_peer(self, name: str) -> None:
        if self.lab is not None:
            self.hosts[name] = self.lab.add_nat(name).host

    def relay_listen(self) -> str:
        relay = self.hosts.get("relay")
        return f"/ip4/{relay.ip}/tcp/4001" if relay else "/ip4/127.0.0.1/tcp/0"

    def peer_args(self) -> list[str]:
        if self.real:
            return ["--listen", "/ip4/0.0.0.0/tcp/0"]  # reachability found by dial-back
        return ["--reachability", "private", "--listen", "/ip4/127.0.0.1/tcp/0"]

    def describe(self, name: str) -> str:
        host = self.hosts.get(name)
        if host is None:
            return "127.0.0.1 (NAT simulated)"
        if self.lab is not None and name in self.lab.routers:
            router = self.lab.routers[name]
            return f"{host.ip} behind a NAT router whose public address is {router.wan_ip}"
        return f"public address {host.ip}"

    def popen(self, name: str, argv: list[str], out: IO[Any],
              err: IO[Any]) -> subprocess.Popen[Any]:
        host = self.hosts.get(name)
        if host is None:
            return subprocess.Popen(argv, stdout=out, stderr=err)
        return host.popen(argv, stdout=out, stderr=err)

    def browser_url(self, name: str, url: str) -> str:
        """``url`` of ``name``'s web UI as this machine's browser reaches it."""
        host = self.hosts.get(name)
        if host is None or not url.startswith("http://127.0.0.1:"):
            return url
        port = int(url.removeprefix("http://127.0.0.1:").split("/", 1)[0])
        forwarder = Forwarder(host.netns, port)
        self.forwarders.append(forwarder)
        return f"http://127.0.0.1:{forwarder.port}/"

    def close(self) -> None:
        for forwarder in self.forwarders:
            forwarder.close()
        if self.lab is not None:
            self.lab.close()
