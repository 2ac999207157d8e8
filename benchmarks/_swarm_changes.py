"""Peers that arrive during a ``swarm_utilization`` run: one late joiner on a slow downlink
(``--joiner``), and churn (``--churn``): every so often one training peer leaves (stopped as
a user stops it) and a new one arrives in its place."""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.daemon_proc import DaemonProcess, launch_daemon

JOINER_DOWNLOAD_INTERVALS = 4
"""The joiner's downlink is sized so that the state download takes this many sync
intervals."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def state_bytes(work: Path) -> int:
    """Bytes of the newest checkpoint in a worker's folder that a joiner downloads: all but
    the writer's own files, which a local-steps joiner leaves out."""
    from dandelion_p2p.worker.restoring import OWN_FILES

    folders = sorted(f for f in (work / "checkpoints").glob("step-*")
                     if f.name.removeprefix("step-").isdigit())
    if not folders:
        raise RuntimeError(f"no checkpoint in {work} for a joiner to download")
    return sum(f.stat().st_size for f in folders[-1].iterdir()
               if f.is_file() and f.name not in OWN_FILES)


def launch_peer(host: Any, data_dir: Path, images: Path, seed: str,
                config: Path) -> DaemonProcess:
    """A training peer (``daemon --worker``) on ``host``, started without waiting for it."""
    data_dir.mkdir()
    shutil.copytree(images, data_dir / "training-data")
    return launch_daemon("daemon", [
        "--listen", f"/ip4/{host.ip}/tcp/4001", "--reachability", "public",
        "--bootstrap", seed, "--run-config", str(config), "--worker"], data_dir,
        launcher=host)


def start_joiner(lab: Any, work: Path, images: Path, rate_mbit: float, seed: str,
                 config: Path, peer0: DaemonProcess,
                 run_folder: Path) -> tuple[DaemonProcess, dict[str, Any]]:
    """One more peer, on a downlink on which the swarm's state (peer 0's newest checkpoint
    in ``run_folder``) takes ``JOINER_DOWNLOAD_INTERVALS`` of peer 0's sync intervals."""
    from tests.worker_logs import sync_interval

    interval = sync_interval(peer0)
    if not interval:
        raise RuntimeError("peer 0 logged no two rounds before the joiner")
    size = state_bytes(run_folder)
    down = round(size * 8 / (JOINER_DOWNLOAD_INTERVALS * interval) / 1e6, 3)
    host = lab.add_public_host("joiner", up_mbit=rate_mbit, down_mbit=down)
    daemon = launch_peer(host, work / "joiner", images, seed, config)
    daemon.wait_ready(30.0)
    return daemon, {"joiner_down_mbit": down, "state_mb": round(size / 1e6, 2),
                    "sync_interval_s": interval}


def joiner_figures(joiner: DaemonProcess, known: dict[str, Any]) -> dict[str, Any]:
    """When the joiner's download began and ended, when it held the swarm's weights for good
    (``held_swarm_weights_at``) and when it took part in a round with the others, from its
    log; the issue's bound 1.2 x download + 2 sync intervals beside them."""
    from tests.worker_logs import held_swarm_weights_at, logged_at

    log = joiner.logs()
    began, arrived, joined = (logged_at(log, pattern) for pattern in (
        "downloading the state of step", "downloaded the state at step",
        "joined the swarm at round"))
    held = held_swarm_weights_at(log)
    kept = re.search(r"joined the swarm at round (\d+) \((\d+) rounds replayed", log)
    download = arrived - began if began is not None and arrived is not None else None
    out = {**known, "download_s": download and round(download, 1),
           "download_start_to_held_s": (round(held - began, 1)
                                        if began is not None and held is not None else None),
           "download_start_to_joined_s": (round(joined - began, 1)
                                          if began is not None and joined is not None
                                          else None),
           "rounds_replayed": kept and int(kept.group(2))}
    if download is not None:
        out["bound_s"] = round(1.2 * download + 2 * known["sync_interval_s"], 1)
    return out


@dataclass
class Peer:
    name: str
    daemon: DaemonProcess
    run_folder: Path
    """The worker's folder of the run (train_log.jsonl, sync_log.jsonl, checkpoints)."""
    started: float
    """time.time() when it was launched."""
    left: float | None = None


@dataclass
class Churn:
    """Every ``every_s`` seconds, the longest-serving peer but peer 0 (kept as the run's
    reference) is stopped with SIGTERM and a new peer is launched on a host of its own with
    the same link."""

    every_s: float
    lab: Any
    work: Path
    images: Path
    config: Path
    seed: str
    rate_mbit: float
    run_name: str
    last: float = field(default_factory=time.monotonic)
    arrived: int = 0

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s

    def swap(self, active: list[Peer]) -> Peer:
        """Stop one of ``active`` (removed from it) and launch its replacement (appended
        and returned)."""
        self.last = time.monotonic()
        leaving = active.pop(1)
        leaving.daemon.stop(timeout=30.0)
        leaving.left = time.time()
        self.arrived += 1
        name = f"c{self.arrived}"
        host = self.lab.add_public_host(name, up_mbit=self.rate_mbit, down_mbit=self.rate_mbit)
        peer = Peer(name, launch_peer(host, self.work / name, self.images, self.seed,
                                      self.config),
                    self.work / name / "worker" / self.run_name, time.time())
        active.append(peer)
        return peer


def arrival_figures(peer: Peer, reference: Path) -> dict[str, Any]:
    """For a peer that arrived during the run: seconds from its launch to the end of the
    first round after which it held the same global weights as ``reference`` (peer 0's
    run folder), and how many of its rounds after that did."""
    mine = {e["round"]: e for e in read_jsonl(peer.run_folder / "sync_log.jsonl")
            if "digest" in e}
    theirs = {e["round"]: e["digest"] for e in read_jsonl(reference / "sync_log.jsonl")
              if "digest" in e}
    steps = {int(e["step"]): float(e["time"])
             for e in read_jsonl(peer.run_folder / "train_log.jsonl") if "time" in e}
    same = sorted(r for r, e in mine.items() if theirs.get(r) == e["digest"])
    out: dict[str, Any] = {"peer": peer.name, "rounds": len(mine)}
    if same:
        # The round's end is when its first step after it ended, or the peer's last step.
        h_step = mine[same[0]]["global_step"]
        after = [t for s, t in steps.items() if s > h_step]
        out["held_swarm_weights_after_s"] = (round(min(after) - peer.started, 1)
                                             if after else None)
        out["rounds_with_swarm_weights"] = sum(1 for r in mine if r >= same[0]
                                               and theirs.get(r) == mine[r]["digest"])
        # A peer that left cut its last round short: the others applied it, it did not.
        counted = [r for r in mine if r >= same[0] and r in theirs
                   and not (peer.left is not None and r == max(mine))]
        out["rounds_apart_after_that"] = sum(1 for r in counted
                                             if theirs[r] != mine[r]["digest"])
    return out


def final_agreement(peers: list[Peer]) -> dict[str, Any]:
    """Whether the peers present at the end that took part in rounds hold the same global
    weights in their last common round with a digest."""
    logs = [log for p in peers
            if (log := {e["round"]: e["digest"]
                        for e in read_jsonl(p.run_folder / "sync_log.jsonl") if "digest" in e})]
    common = set.intersection(*(set(log) for log in logs)) if logs else set()
    if not common:
        return {"last_common_round": None, "digests_agree": False}
    last = max(common)
    return {"last_common_round": last,
            "digests_agree": len({log[last] for log in logs}) == 1}
