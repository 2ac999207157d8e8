"""Swarm compute utilization: how much of the wall time each peer's trainer spends training.

N daemons, each in its own network namespace with its link capped (``dandelion_p2p.netlab``),
each starting its own worker (``daemon --worker``, as users run them), train the tiny SD model
in local-steps mode. Before them, in the same run, N workers train alone at once
(``dandelion-p2p worker --run-config``), which gives the reference: the time of one inner step
and the samples/s of N peers that never wait for anyone.

The link rate is derived from that step time so that one round's lower bound
2(n-1)/n * S / B (S: the averaged vector as the codec sends it) equals the compute time of H
inner steps (``--ratios 1``), or is that many times longer (``5``: the regime of H = 50 for
SD 1.5 on 100 Mbit/s, where 1 is that of H = 500).

Reported per sync mode and ratio, each figure the workers' own (train_log.jsonl and
sync_log.jsonl), over the steady state (from the first step after round 2 to the last step:
round 1 waits the whole gathering window, and with overlap its wait lands at round 2):
compute utilization (time in train steps / wall; beside it the worker's own count of seconds
it did not train), swarm samples/s against the N solo workers', the ratio the run actually had
(the swarm's steps can be slower or faster than the solo workers' on a shared machine), and
bytes sent per peer per round of the whole vector, i.e. per H steps (every byte on the peer's
link: averaging, DHT, control). Modes: ``blocking``, ``overlap`` and ``streaming``
(``sync.fragments = --fragments``: a round of one fragment every H / fragments steps). And
the quality figure of ``benchmarks/quality.py``'s method: the validation loss of peer 0's
final global weights on held-out images, with noise and timesteps fixed per image, beside
blocking mode's at the same ratio (and a solo worker's, which saw 1/N of the samples).
The images are the quality benchmark's captioned shapes.

``--joiner R``: one more peer starts once the swarm is R rounds in, on a downlink on which
the swarm's newest checkpoint takes ``JOINER_DOWNLOAD_INTERVALS`` of peer 0's sync intervals
to download; reported: how long the download took and when the joiner held the swarm's
weights, against 1.2 x the download + 2 sync intervals. ``--churn S``: every S seconds one
peer (never peer 0) is stopped and a new one starts on a link of its own; the figures above
are then those of the peers that trained from start to end, and reported beside them: when
each arrival first held peer 0's global weights (digest of the same round) and how many of
its later rounds did not, and whether the peers present at the end agree. ``--size-codec
fp16`` with ``--codec int4`` sizes the links for fp16 and sends int4.

    nice -n 10 python benchmarks/swarm_utilization.py --peers 3 --local-steps 4 --rounds 5
    python benchmarks/swarm_utilization.py --modes overlap --ratios 1 --rounds 12 --joiner 2
    python benchmarks/swarm_utilization.py --ratios 1 --rounds 40 --churn 30

Needs root (network namespaces, tc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._report import environment, format_table, median, write_json  # noqa: E402
from benchmarks._swarm_changes import (  # noqa: E402
    JOINER_DOWNLOAD_INTERVALS,
    Churn,
    Peer,
    arrival_figures,
    final_agreement,
    joiner_figures,
    launch_peer,
    read_jsonl,
    start_joiner,
)
from tests.daemon_proc import DaemonProcess, launch_daemon, start_daemons  # noqa: E402

RUN_NAME = "utilization"
VALIDATION_IMAGES = 32
"""Held-out images (made with another seed than the training set's) for the quality figure."""
CODEC_BITS = {"none": 32.0, "fp16": 16.0, "bf16": 16.0, "int8": 8.0, "int4": 4.5, "int2": 2.25}
"""Bits a value on the wire; int4 carries a 32-bit scale per block of 64 values, int2 per
block of 128."""
SKIPPED_ROUNDS = 2
"""Rounds before the steady state: the first waits the whole gathering window (nobody is
expected yet), and with overlap that wait is paid at the next boundary."""
SYNC_MODES: dict[str, dict[str, Any]] = {
    "blocking": {"overlap": False}, "overlap": {"overlap": True},
    "streaming": {"overlap": True, "fragments": 2}}
"""Sync mode -> what it sets in the run config's ``[sync]`` (``--fragments`` sets
streaming's)."""


# ---------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Args:
    peers: int
    local_steps: int
    rounds: int
    batch: int
    codec: str
    gather_window: float
    images: int
    timeout: float
    threads: int
    joiner: int = 0
    """Rounds the swarm is in when one more peer joins on a slow downlink (0: none)."""
    churn: float = 0.0
    """Seconds between two swaps of a leaving peer for an arriving one (0: none)."""

    @property
    def steps(self) -> int:
        return self.local_steps * self.rounds


def sync_interval(a: Args, mode: str) -> int:
    """Steps between two of the mode's rounds: H, or H / fragments when streaming."""
    return a.local_steps // int(SYNC_MODES[mode].get("fragments", 1))


def supported_modes() -> list[str]:
    """The sync modes this checkout's run config knows (overlap only where ``sync.overlap``
    exists)."""
    from dandelion_p2p.runconfig.schema import SyncConfig

    names = {f.name for f in fields(SyncConfig)}
    return [m for m, extra in SYNC_MODES.items() if set(extra) <= names]


def write_run_config(path: Path, model: Path, a: Args, mode: str) -> None:
    from dandelion_p2p.runconfig.schema import from_dict

    config = from_dict({
        "name": RUN_NAME,
        "model": {"base": str(model)},
        "training": {"method": "full", "resolution": 64, "bucket_min": 64, "bucket_max": 64,
                     "batch_size": a.batch, "max_steps": a.steps, "seed": 7},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "sync": {"mode": "local_steps", "local_steps": a.local_steps, **SYNC_MODES[mode]},
        "averaging": {"codec": a.codec, "gather_window": a.gather_window,
                      "chunk_timeout": 60.0},
        # One checkpoint, at the end: saves would count as time not training. An arriving
        # peer needs a state to download: then one a round.
        "checkpoint": ({"every_steps": a.local_steps, "keep_last": 2} if a.joiner or a.churn
                       else {"every_steps": a.steps, "keep_last": 1}),
    })
    path.write_text(config.to_toml())


# ---------------------------------------------------------------------------- timings


@dataclass
class PeerFigures:
    """One worker's steady state: from its first step after round 2 to its last step."""

    steps: int
    wall_s: float
    busy_s: float
    samples_per_s: float
    step_s: float
    """The median step without a round in it."""
    rounds: int = 0
    vector_rounds: float = 0.0
    """Rounds in units of the whole vector: a streaming round carries one fragment."""
    averaged: int = 0
    round_s: list[float] = field(default_factory=list)
    waited_s: float | None = None
    """The worker's own count of seconds it did not train for the rounds in the window
    (sync_log's ``waited``, where the worker writes it)."""
    tx_bytes: int | None = None
    first_step: int = 0
    last_step: int = 0

    @property
    def utilization(self) -> float:
        return self.busy_s / self.wall_s if self.wall_s else 0.0


def step_figures(train_log: list[dict[str, Any]], h: int, batch: int,
                 interval: int = 0) -> PeerFigures:
    """The log holds each step's end time. An interval between two steps holds one step,
    and after a sync boundary (every ``interval`` steps: H, or H / fragments) also the
    sync: those count as the median plain step, the rest as measured. A restarted worker
    repeats steps: the last record of each counts."""
    interval = interval or h
    ends = {int(e["step"]): float(e["time"]) for e in train_log if "time" in e}
    steps = sorted(s for s in ends if s > SKIPPED_ROUNDS * h)
    if len(steps) < 3:
        raise RuntimeError(f"too few steps after round {SKIPPED_ROUNDS} in the log "
                           f"({len(steps)})")
    intervals = {s: ends[s] - ends[s - 1] for s in steps[1:] if s - 1 in ends}
    plain = [d for s, d in intervals.items() if (s - 1) % interval != 0]
    typical = median(plain) if plain else median(list(intervals.values()))
    busy = sum(d if (s - 1) % interval != 0 else min(d, typical)
               for s, d in intervals.items())
    wall = ends[steps[-1]] - ends[steps[0]]
    return PeerFigures(steps=len(intervals), wall_s=wall, busy_s=busy,
                       samples_per_s=len(intervals) * batch / wall if wall else 0.0,
                       step_s=typical,
                       first_step=steps[0], last_step=steps[-1])


def trainable_elements(work: Path) -> int:
    """Elements of the weights a round averages, counted in the worker's last checkpoint."""
    from safetensors import safe_open

    folders = sorted(work.glob("checkpoints/step-*"))
    if not folders:
        raise RuntimeError(f"no checkpoint in {work}")
    total = 0
    with safe_open(str(folders[-1] / "trainable.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            total += math.prod(f.get_slice(key).get_shape())
    return total


# ---------------------------------------------------------------------------- solo


def worker_env(threads: int) -> dict[str, str]:
    """The environment of every process started here: ``threads`` compute threads per
    worker, so that N peers sharing one machine's cores do not each spin one per core."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_solo(root: Path, model: Path, images: Path, a: Args) -> tuple[list[PeerFigures], int]:
    """N workers alone at once (same CPU contention as the swarm's N); their figures and the
    size of the averaged vector in elements."""
    config = root / "solo.toml"
    write_run_config(config, model, a, "blocking")
    procs = []
    for i in range(a.peers):
        work = root / f"solo{i}"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dandelion_p2p.cli", "worker", "--run-config", str(config),
             "--data", str(images), "--work-dir", str(work), "--no-export"],
            stdout=subprocess.DEVNULL, stderr=(root / f"solo{i}.log").open("w"),
            env=worker_env(a.threads)))
    try:
        for i, p in enumerate(procs):
            if p.wait(timeout=a.timeout) != 0:
                raise RuntimeError(f"solo worker {i} failed:\n"
                                   + (root / f"solo{i}.log").read_text()[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    figures = [step_figures(read_jsonl(root / f"solo{i}" / "train_log.jsonl"), a.local_steps,
                            a.batch) for i in range(a.peers)]
    return figures, trainable_elements(root / "solo0")


# ---------------------------------------------------------------------------- swarm


@dataclass(frozen=True)
class Plan:
    """One swarm run. Every peer starts at once and trains to the end; churn (peers leaving
    and arriving) and late joiners would be more peers with a start and a stop time."""

    mode: str
    ratio: float
    rate_mbit: float


def link_tx_bytes(host: Any) -> int:
    out = host.run(["ip", "-j", "-s", "link", "show", "dev", "eth0"]).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def run_swarm(root: Path, model: Path, images: Path, a: Args, plan: Plan
              ) -> tuple[list[PeerFigures], float, dict[str, Any]]:
    """The swarm of ``plan``: the figures of the peers that trained from start to end, the
    run's wall seconds, and what arrivals did (``joiner``, ``churn``: absent without them)."""
    from dandelion_p2p.netlab import NetLab

    work = root / f"{plan.mode}-x{plan.ratio:g}"
    work.mkdir(parents=True)
    config = work / "run.toml"
    write_run_config(config, model, a, plan.mode)
    seed: list[DaemonProcess] = []
    active: list[Peer] = []
    gone: list[Peer] = []
    extra: dict[str, Any] = {}
    with NetLab() as lab:
        hosts = [lab.add_public_host(f"p{i}", up_mbit=plan.rate_mbit, down_mbit=plan.rate_mbit)
                 for i in range(a.peers)]
        seed_host = lab.add_public_host("seed")
        try:
            # A bootstrap node without a worker, so that the peers (and their workers) all
            # start at once: each needs only the seed.
            seed = start_daemons([launch_daemon(
                "daemon", ["--listen", f"/ip4/{seed_host.ip}/tcp/4001",
                           "--reachability", "public", "--no-worker"],
                work / "seed", launcher=seed_host)], 60.0)
            seed_addr = seed[0].addrs[0]
            launched = [launch_peer(host, work / f"peer{i}", images, seed_addr, config)
                        for i, host in enumerate(hosts)]
            active = [Peer(f"peer{i}", d, work / f"peer{i}" / "worker" / RUN_NAME, time.time())
                      for i, d in enumerate(start_daemons(launched, 60.0))]
            original = list(active)
            sent_before = [link_tx_bytes(h) for h in hosts]
            started = time.monotonic()
            deadline = started + a.timeout
            joiner: Peer | None = None
            churn = (Churn(a.churn, lab, work, images, config, seed_addr, plan.rate_mbit,
                           RUN_NAME) if a.churn else None)
            arrivals: list[Peer] = []
            while True:
                if a.joiner and joiner is None and len(read_jsonl(
                        active[0].run_folder / "sync_log.jsonl")) >= a.joiner:
                    daemon, extra["joiner"] = start_joiner(
                        lab, work, images, plan.rate_mbit, seed_addr, config,
                        active[0].daemon, active[0].run_folder)
                    joiner = Peer("joiner", daemon, work / "joiner" / "worker" / RUN_NAME,
                                  time.time())
                    active.append(joiner)
                if (churn is not None and churn.due() and len(active) > 1
                        and len(read_jsonl(active[0].run_folder / "sync_log.jsonl"))
                        < a.rounds * 2 // 3):
                    # (None in the last third: an arrival needs rounds to join and train.)
                    gone.append(active[1])
                    arrivals.append(churn.swap(active))
                states = [status_of(p.daemon) for p in active]
                if all(s.get("state") == "stopped" for s in states):
                    break
                crashed = [i for i, s in enumerate(states) if s.get("state") == "crashed"]
                if crashed or time.monotonic() > deadline:
                    raise RuntimeError(f"{plan}: states {states}\n"
                                       + active[crashed[0] if crashed else 0].daemon.logs()[-4000:])
                time.sleep(1.0)
            seconds = time.monotonic() - started
            sent = [link_tx_bytes(h) - b for h, b in zip(hosts, sent_before, strict=True)]
            if joiner is not None:
                extra["joiner"] = joiner_figures(joiner.daemon, extra["joiner"])
            if churn is not None:
                extra["churn"] = {
                    "every_s": a.churn, "left": [p.name for p in gone],
                    "arrivals": [arrival_figures(p, active[0].run_folder) for p in arrivals],
                    "at_end": [p.name for p in active], **final_agreement(active)}
        finally:
            for d in [p.daemon for p in active] + seed:
                with contextlib.suppress(AssertionError):
                    d.stop(timeout=20.0)
    figures = []
    for i, peer in enumerate(original):
        if peer in gone:
            continue
        f = step_figures(read_jsonl(peer.run_folder / "train_log.jsonl"), a.local_steps,
                         a.batch, sync_interval(a, plan.mode))
        rounds = {r["round"]: r for r in read_jsonl(peer.run_folder / "sync_log.jsonl")}
        f.rounds = len(rounds)
        f.vector_rounds = len(rounds) * sync_interval(a, plan.mode) / a.local_steps
        f.averaged = sum(1 for r in rounds.values() if r.get("averaged"))
        f.round_s = [float(r["seconds"]) for r in rounds.values()]
        inside = [r for r in rounds.values() if f.first_step <= r["global_step"] < f.last_step]
        if inside and all("waited" in r for r in inside):
            f.waited_s = sum(float(r["waited"]) for r in inside)
        f.tx_bytes = sent[i]
        figures.append(f)
    return figures, seconds, extra


def status_of(daemon: DaemonProcess) -> dict[str, Any]:
    """A peer's training status; ``starting`` while its control socket is not up yet."""
    from dandelion_p2p.errors import PeerUnavailable

    try:
        return daemon.call("training.status")
    except PeerUnavailable as exc:
        if daemon.proc.poll() is not None:
            return {"state": "crashed", "detail": str(exc)}
        return {"state": "starting"}


# ---------------------------------------------------------------------------- report


def final_loss(validator: Any, work: Path) -> float:
    """The quality benchmark's validation loss (fixed noise and timesteps per held-out image)
    of the weights in ``work``'s last checkpoint: the swarm's G, which every peer shares."""
    from safetensors.torch import load_file

    folders = sorted(work.glob("checkpoints/step-*"))
    if not folders:
        raise RuntimeError(f"no checkpoint in {work}")
    return float(validator.loss(load_file(folders[-1] / "trainable.safetensors")))


def blocking_loss(results: list[dict[str, Any]], r: dict[str, Any]) -> float:
    """The validation loss of blocking mode at ``r``'s ratio (``r``'s own without one)."""
    for other in results:
        if other["mode"] == "blocking" and other["ratio"] == r["ratio"]:
            return float(other["val_loss"])
    return float(r["val_loss"])


def summarize(plan: Plan, figures: list[PeerFigures], solo: list[PeerFigures],
              seconds: float, bound_s: float, h: int) -> dict[str, Any]:
    """``bound_s``: one round's lower bound on this plan's links."""
    swarm_rate = sum(f.samples_per_s for f in figures)
    # The link was sized from the solo workers' step; on a shared machine the swarm's own
    # steps can be slower or faster, which moves the ratio the run actually had.
    swarm_step = median([f.step_s for f in figures])
    solo_rate = sum(f.samples_per_s for f in solo)
    rounds = max((f.rounds for f in figures), default=0)
    return {
        "mode": plan.mode, "ratio": plan.ratio, "link_mbit": plan.rate_mbit,
        "bound_s": bound_s, "swarm_step_s": swarm_step,
        "ratio_realized": bound_s / (h * swarm_step) if swarm_step else None,
        "seconds": seconds,
        "utilization_min": min(f.utilization for f in figures),
        "utilization_median": median([f.utilization for f in figures]),
        "waited_of_wall_median": median([f.waited_s / f.wall_s for f in figures
                                         if f.waited_s is not None and f.wall_s]),
        "swarm_samples_per_s": swarm_rate,
        "solo_samples_per_s": solo_rate,
        "of_solo": swarm_rate / solo_rate if solo_rate else None,
        "rounds": rounds,
        "rounds_averaged_min": min(f.averaged for f in figures),
        "round_s_median": median([s for f in figures for s in f.round_s]),
        # Per H steps (one whole vector's round; a streaming round sends one fragment).
        "mb_per_peer_per_round": median([f.tx_bytes / f.vector_rounds / 1e6 for f in figures
                                         if f.tx_bytes is not None and f.vector_rounds]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=4, help="H, inner steps per round")
    p.add_argument("--rounds", type=int, default=5,
                   help=f"at least {SKIPPED_ROUNDS + 2} (the first {SKIPPED_ROUNDS} do not "
                        "count)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--codec", default="fp16", choices=sorted(CODEC_BITS))
    p.add_argument("--gather-window", type=float, default=5.0,
                   help="the run config's; only a first round waits all of it")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--ratios", default="1,5", help="round bound / H steps' compute time")
    p.add_argument("--joiner", type=int, default=0,
                   help="R: one more peer joins once the swarm is R rounds in, on a downlink "
                   f"on which the state takes {JOINER_DOWNLOAD_INTERVALS} sync intervals")
    p.add_argument("--churn", type=float, default=0.0, metavar="SECONDS",
                   help="every SECONDS one peer (never peer 0) leaves and a new one arrives")
    p.add_argument("--size-codec", default="", choices=["", *sorted(CODEC_BITS)],
                   help="the codec whose vector sizes the link (default: --codec): e.g. "
                   "fp16 with --codec int4 is the fp16 regime's link sending int4")
    p.add_argument("--modes", default="", help="comma-separated (default: every mode the "
                   f"run config supports of {', '.join(SYNC_MODES)})")
    p.add_argument("--fragments", type=int, default=2,
                   help="streaming mode's sync.fragments (must divide --local-steps)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads per worker (0: the libraries' default)")
    p.add_argument("--json", default=None)
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    ns = p.parse_args(argv)
    if ns.peers < 3 or ns.rounds < SKIPPED_ROUNDS + 2:
        p.error(f"needs --peers >= 3 and --rounds >= {SKIPPED_ROUNDS + 2}")
    from dandelion_p2p.netlab import netlab_unavailable_reason

    if reason := netlab_unavailable_reason():
        raise SystemExit(f"needs the network lab: {reason}")
    if ns.joiner and ns.rounds < ns.joiner + JOINER_DOWNLOAD_INTERVALS + 4:
        p.error(f"--joiner {ns.joiner} needs --rounds >= "
                f"{ns.joiner + JOINER_DOWNLOAD_INTERVALS + 4}: the download takes "
                f"{JOINER_DOWNLOAD_INTERVALS} rounds, and the joiner must then join and train")
    modes = [m for m in ns.modes.split(",") if m] or supported_modes()
    unknown = set(modes) - set(supported_modes())
    if unknown:
        p.error(f"this checkout's run config has no mode {sorted(unknown)}")
    if "streaming" in modes and ns.local_steps % ns.fragments:
        p.error("--fragments must divide --local-steps (streaming mode)")
    SYNC_MODES["streaming"]["fragments"] = ns.fragments
    a = Args(ns.peers, ns.local_steps, ns.rounds, ns.batch, ns.codec, ns.gather_window,
             ns.images, ns.timeout, ns.threads, ns.joiner, ns.churn)
    # Daemons pass their environment on to the workers they start.
    os.environ.update(worker_env(a.threads))
    ratios = [float(r) for r in ns.ratios.split(",")]

    from benchmarks.quality import Validator, make_dataset
    from dandelion_p2p.worker.tiny import build_tiny_pipeline

    root = Path(tempfile.mkdtemp(prefix="swarm-util-"))
    try:
        model = build_tiny_pipeline(root / "model")
        images, val = root / "images", root / "val"
        make_dataset(images, ns.images)
        make_dataset(val, VALIDATION_IMAGES, seed=1)
        solo, elements = run_solo(root, model, images, a)
        write_run_config(root / "val.toml", model, a, "blocking")
        from dandelion_p2p.runconfig.schema import loads

        validator = Validator(loads((root / "val.toml").read_text()), val, root / "val-work")
        solo_loss = final_loss(validator, root / "solo0")
        print(f"validation loss of a solo worker's final weights: {solo_loss:.5f}", flush=True)
        step_s = median([f.busy_s / f.steps for f in solo])
        vector_bits = elements * CODEC_BITS[a.codec]
        size_codec = ns.size_codec or a.codec
        sizing_bits = elements * CODEC_BITS[size_codec]
        n = a.peers
        # One round's bound 2(n-1)/n * S / B equals H steps' compute time at ratio 1, S as
        # the sizing codec sends the vector.
        rate_ratio1 = 2 * (n - 1) / n * sizing_bits / (a.local_steps * step_s) / 1e6
        print(f"solo: {n} workers alone at once, {step_s:.3f} s per inner step, "
              f"{sum(f.samples_per_s for f in solo):.2f} samples/s together; averaged vector "
              f"{elements} elements, {vector_bits / 8e6:.2f} MB as {a.codec}; ratio 1 "
              f"(sized for {size_codec}) at {rate_ratio1:.2f} Mbit/s", flush=True)
        results = []
        for ratio in ratios:
            for mode in modes:
                plan = Plan(mode, ratio, round(rate_ratio1 / ratio, 3))
                figures, seconds, arrivals = run_swarm(root, model, images, a, plan)
                bound_s = 2 * (n - 1) / n * vector_bits / (plan.rate_mbit * 1e6)
                results.append(summarize(plan, figures, solo, seconds, bound_s, a.local_steps))
                results[-1].update(arrivals)
                results[-1]["val_loss"] = final_loss(
                    validator, root / f"{mode}-x{ratio:g}" / "peer0" / "worker" / RUN_NAME)
                print(json.dumps(results[-1]), flush=True)
    finally:
        if ns.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    headers = ["mode", "ratio (run's)", "link Mbit/s", "utilization (min / median)",
               "waited/wall", "samples/s", "of N x solo", "rounds (averaged)", "s/round",
               "MB/peer/H steps", "val loss (x blocking)"]
    rows = [[r["mode"], f"{r['ratio']:g} ({r['ratio_realized']:.2f})", r["link_mbit"],
             f"{r['utilization_min']:.2f} / {r['utilization_median']:.2f}",
             r["waited_of_wall_median"],
             r["swarm_samples_per_s"], r["of_solo"],
             f"{r['rounds']} ({r['rounds_averaged_min']})", r["round_s_median"],
             r["mb_per_peer_per_round"],
             f"{r['val_loss']:.5f} ({r['val_loss'] / blocking_loss(results, r):.3f})"]
            for r in results]
    print(format_table(headers, rows))
    for r in results:
        for what in ("joiner", "churn"):
            if what in r:
                print(f"{what} ({r['mode']}, ratio {r['ratio']:g}): {json.dumps(r[what])}")
    path = write_json("swarm_utilization", {
        "environment": environment(), "peers": a.peers, "local_steps": a.local_steps,
        "rounds": a.rounds, "batch": a.batch, "codec": a.codec, "size_codec": size_codec,
        "joiner_after_rounds": a.joiner, "churn_every_s": a.churn,
        "step_s": step_s,
        "elements": elements, "rate_ratio1_mbit": rate_ratio1, "solo_val_loss": solo_loss,
        "results": results}, ns.json)
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
