"""``make demo``: a local swarm on this machine — one public relay and two peers that join it.

The two peers are told they are behind NAT (``--reachability private``), so, as on the
internet, they can only be reached through the relay: they reserve a slot there, publish
their relayed addresses in the DHT, find each other through it, and exchange signed notes.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dandelion_p2p.control import call_sync


class Proc:
    def __init__(self, name: str, args: list[str], data_dir: Path) -> None:
        self.name = name
        self.data_dir = data_dir
        data_dir.mkdir(parents=True)
        self.out = data_dir / "stdout.log"
        self.err = data_dir / "daemon.log"
        argv = [sys.executable, "-m", "dandelion_p2p.cli", *args, "--data-dir", str(data_dir)]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err)
        self.peer_id = ""
        self.addrs: list[str] = []

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.out.read_text().splitlines()
            if "ready" in lines:
                self.peer_id = next(x[9:] for x in lines if x.startswith("peer id: "))
                self.addrs = [x[9:] for x in lines if x.startswith("address: ")]
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited early:\n{self.err.read_text()}")
            time.sleep(0.1)
        raise SystemExit(f"{self.name} did not start within {timeout} s")

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return call_sync(self.data_dir / "control.sock", method, params, timeout=30.0)

    def stop(self) -> float:
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        return time.monotonic() - start


def short(peer_id: str) -> str:
    return f"{peer_id[:8]}…{peer_id[-4:]}"


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="dandelion-demo-"))
    procs: list[Proc] = []
    try:
        print("Starting a public relay node: dandelion-p2p daemon --relay")
        relay = Proc("relay", ["daemon", "--relay", "--listen", "/ip4/127.0.0.1/tcp/0"],
                     root / "relay")
        procs.append(relay)
        relay.wait_ready()
        print(f"  relay {short(relay.peer_id)} at {relay.addrs[0]}")

        peers = []
        for name in ("alice", "bob"):
            print(f"Starting {name}: dandelion-p2p join <relay address> (simulated NAT)")
            p = Proc(name, ["join", relay.addrs[0], "--reachability", "private",
                            "--listen", "/ip4/127.0.0.1/tcp/0"], root / name)
            procs.append(p)
            p.wait_ready()
            peers.append(p)
            status = p.call("status")
            print(f"  {name} {short(p.peer_id)}: reachable only through "
                  f"{len(status['relay_reservations'])} relay reservation(s)")
            print(f"    advertises {status['addrs'][0]}")
        alice, bob = peers

        members = alice.call("members")["members"]
        print(f"\nalice looks up the swarm's members in the DHT: {len(members)} found")
        for peer_id, info in sorted(members.items()):
            kind = "public" if info["reachable"] else "behind NAT"
            print(f"  {short(peer_id)}  {kind:10}  {' '.join(info['roles'])}")

        print("\nSigned notes, each found through the DHT and carried through the relay:")
        for sender, receiver, text in ((alice, bob, "hi bob"), (bob, alice, "hi alice")):
            started = time.monotonic()
            result = sender.call("send", {"peer": receiver.peer_id, "text": text})
            ms = (time.monotonic() - started) * 1000
            print(f"  {sender.name} -> {receiver.name}: {text!r}; verified signed receipt "
                  f"{result['receipt']!r} in {ms:.0f} ms")
        conns = alice.call("status")["connected_peers"]
        connection = {c["peer_id"]: c["connection"] for c in conns}
        print(f"  alice's connection to bob is {connection.get(bob.peer_id, 'gone')}")

        print("\nShutting down (SIGTERM):")
        for p in reversed(procs):
            print(f"  {p.name} stopped in {p.stop():.2f} s (exit code {p.proc.returncode})")
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
