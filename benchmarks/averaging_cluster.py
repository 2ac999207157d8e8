"""Start and drive N ``averaging_peer.py`` processes (used by the benchmark and the tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

PEER_SCRIPT = Path(__file__).with_name("averaging_peer.py")


class Launcher(Protocol):
    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]: ...


@dataclass
class Peer:
    index: int
    proc: subprocess.Popen[str]
    out: Path
    log: Path
    seed: int
    weight: float
    peer_id: str = ""
    addr: str = ""

    def results(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)


@dataclass
class Cluster:
    peers: list[Peer] = field(default_factory=list)

    def go(self) -> None:
        for p in self.peers:
            assert p.proc.stdin is not None
            p.proc.stdin.write("go\n")
            p.proc.stdin.flush()

    def wait(self, timeout: float, peers: Sequence[Peer] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for p in peers or self.peers:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                p.proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"peer {p.index} still running after {timeout} s:\n{p.log.read_text()[-3000:]}"
                ) from None

    def stop(self) -> None:
        for p in self.peers:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGCONT)
                p.proc.kill()
            p.proc.wait()


def start_cluster(
    n: int,
    workdir: Path,
    *,
    size: int,
    rounds: int,
    weights: Sequence[float] | None = None,
    extra: Sequence[str] = (),
    per_peer: dict[int, Sequence[str]] | None = None,
    launchers: Sequence[Launcher] | None = None,
    ips: Sequence[str] | None = None,
    bootstrap: str = "",
    ready_timeout: float = 60.0,
) -> Cluster:
    """Start ``n`` peers; returns once all printed ``ready``. Without ``bootstrap`` the first
    peer seeds the DHT for the others. The others start together: each only needs the seed."""
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster()
    seeded = bool(bootstrap)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        for i in range(n):
            out, log = workdir / f"peer{i}.jsonl", workdir / f"peer{i}.log"
            weight = float(weights[i]) if weights else 1.0
            argv = [
                sys.executable, str(PEER_SCRIPT), "--seed", str(i), "--weight", str(weight),
                "--size", str(size), "--rounds", str(rounds), "--out", str(out),
                "--ip", ips[i] if ips else "127.0.0.1", "--data-dir", str(workdir / f"data{i}"),
                *(["--bootstrap", bootstrap] if bootstrap else []),
                *extra, *((per_peer or {}).get(i, ())),
            ]
            launcher_kwargs: dict[str, Any] = dict(
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                env=env,
            )
            if launchers:
                proc = launchers[i].popen(argv, **launcher_kwargs)
            else:
                proc = subprocess.Popen(argv, **launcher_kwargs)
            peer = Peer(i, proc, out, log, seed=i, weight=weight)
            cluster.peers.append(peer)
            if i == 0 and not seeded:
                _wait_ready(peer, ready_timeout)
                bootstrap = peer.addr
        for peer in cluster.peers:
            if not peer.peer_id:
                _wait_ready(peer, ready_timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_ready(peer: Peer, timeout: float) -> None:
    assert peer.proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = peer.proc.stdout.readline()
        if line.startswith("ready "):
            _, peer.peer_id, peer.addr = line.split()
            return
        if not line and peer.proc.poll() is not None:
            raise AssertionError(f"peer {peer.index} exited:\n{peer.log.read_text()[-3000:]}")
    raise AssertionError(f"peer {peer.index} not ready within {timeout} s")
