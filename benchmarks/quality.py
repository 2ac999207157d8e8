"""Does the swarm learn as well as one machine? A training-quality benchmark.

The same tiny SD model, the same data (a deterministic set of captioned images made here: a
shape of one colour on a background of another, described by its caption, with a held-out
validation split) and the same seed, trained at equal samples seen:

- ``baseline``: one process with batch n*b (in this process, ``SoloLink``);
- ``gradient-<codec>``: n real daemons on loopback and n ``dandelion-p2p worker`` processes
  with batch b each, every step's gradient averaged;
- ``local-H<H>``: the same in local-steps mode, a sync every H steps;
- ``overlap-H<H>``: local steps with ``sync.overlap``: each round averaged while the next
  round's steps train, and applied one round late;
- ``stream-H<H>-F<F>``: overlap with ``sync.fragments = F``: the vector cut into F fragments,
  one synced every H/F steps, each over the H steps since its own last sync;
- ``byzantine-<rule>``: gradient mode with one peer (``quality_byzantine.py``) that hands its
  daemon its gradient scaled by -1000, under ``averaging.aggregation``.

Validation loss: every checkpoint's weights (peer 0's for the swarms) on the validation images,
each with noise and timestep fixed by its content hash, so values compare across runs.
Writes ``results.json`` (every point), ``curves.png`` (drawn with PIL: matplotlib is not in the
venv) and prints a table.

    python benchmarks/quality.py --quick          # CI-sized (tests/test_quality_benchmark.py)
    python benchmarks/quality.py --steps 60 --out /tmp/quality
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.daemon_proc import DaemonProcess, launch_daemon, start_daemons  # noqa: E402

CODEC_BYTES = {"none": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5, "int2": 0.25}
BYZANTINE = Path(__file__).with_name("quality_byzantine.py")
SHAPES = ("circle", "square", "triangle", "stripes")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
           "yellow": (230, 210, 40), "white": (240, 240, 240), "black": (20, 20, 20)}


# ---------------------------------------------------------------------------- data


def make_dataset(folder: Path, count: int, size: int = 64, seed: int = 0) -> None:
    """``count`` captioned images, deterministic from ``seed``: "a red circle on blue"."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    for i in range(count):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        fg, bg = rng.choice(len(names), 2, replace=False)
        image = Image.new("RGB", (size, size), COLOURS[names[bg]])
        draw = ImageDraw.Draw(image)
        r = int(rng.integers(size // 6, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        colour = COLOURS[names[fg]]
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        else:
            for x in range(0, size, 8):
                draw.rectangle((x, 0, x + 3, size), fill=colour)
        path = folder / f"img{i:04d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(f"a {names[fg]} {shape} on {names[bg]}")


# ---------------------------------------------------------------------------- config


def run_config(model: Path, *, steps: int, batch: int, every: int, mode: str = "gradient",
               target_batch: int = 0, local_steps: int = 10, codec: str = "none",
               aggregation: str = "mean", lr: float = 1e-3, gather_window: float = 5.0,
               min_group: int = 2, outer_lr: float = 0.7,
               outer_momentum: float = 0.9, overlap: bool = False, fragments: int = 1) -> Any:
    from dandelion_p2p.runconfig.schema import from_dict

    sync: dict[str, Any] = {"mode": mode}
    if mode == "gradient":
        sync["target_batch"] = target_batch or batch
    else:
        sync.update(local_steps=local_steps, outer_lr=outer_lr, outer_momentum=outer_momentum,
                    overlap=overlap)
        if fragments > 1:
            sync["fragments"] = fragments
    return from_dict({
        "name": "quality",
        "model": {"base": str(model)},
        "training": {"method": "full", "resolution": 64, "bucket_min": 64, "bucket_max": 64,
                     "batch_size": batch, "max_steps": steps, "seed": 7},
        "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 0.0},
        "sync": sync,
        "averaging": {"codec": codec, "aggregation": aggregation,
                      "gather_window": gather_window, "min_group": min_group},
        "checkpoint": {"every_steps": every, "keep_last": 1000},
    })


# ---------------------------------------------------------------------------- validation


class Validator:
    """Validation loss of any checkpoint of the run, with fixed noise and timesteps: the
    trainer's own measure (``dandelion_p2p.worker.validation``), here over every image of a
    separate folder."""

    def __init__(self, config: Any, val: Path, work: Path) -> None:
        import torch

        from dandelion_p2p.worker import validation
        from dandelion_p2p.worker.link import SoloLink
        from dandelion_p2p.worker.train import Trainer, WorkerOptions

        self.torch, self.validation = torch, validation
        toml = work / "val.toml"
        work.mkdir(parents=True, exist_ok=True)
        toml.write_text(config.to_toml())
        self.trainer = Trainer(config, WorkerOptions(data=val, work_dir=work, shard=(0, 1),
                                                     export=False, eight_bit_adam=False),
                               SoloLink(toml))
        feed = self.trainer.feed
        self.batches = validation.batches_of(feed.samples, feed.buckets)  # type: ignore[attr-defined]

    def loss(self, weights: dict[str, Any]) -> float:
        tr = self.trainer
        with self.torch.no_grad():
            for name, param in tr.c.trainable:
                param.copy_(weights[name])
        return float(self.validation.validation_loss(tr.c, tr.batches, self.batches))

    def curve(self, work: Path, start: dict[str, Any]) -> list[tuple[int, float]]:
        from safetensors.torch import load_file

        points = [(0, self.loss(start))]
        for folder in sorted(work.glob("checkpoints/step-*")):
            step = folder.name.removeprefix("step-")
            if step.isdigit():
                points.append((int(step), self.loss(load_file(folder / "trainable.safetensors"))))
        return points


# ---------------------------------------------------------------------------- runs


@dataclass
class Result:
    name: str
    curve: list[tuple[int, float]]
    seconds: float
    bytes_sent_per_peer: float | None
    rounds: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> float:
        return self.curve[-1][1]


def run_baseline(config: Any, train: Path, work: Path) -> float:
    from dandelion_p2p.worker.link import SoloLink
    from dandelion_p2p.worker.train import Trainer, WorkerOptions

    work.mkdir(parents=True, exist_ok=True)
    toml = work / "run.toml"
    toml.write_text(config.to_toml())
    started = time.monotonic()
    trainer = Trainer(config, WorkerOptions(data=train, work_dir=work / "worker", shard=(0, 1),
                                            export=False, eight_bit_adam=False), SoloLink(toml))
    trainer.resume()
    trainer.run()
    trainer.close()
    return time.monotonic() - started


def _find_bytes(status: Any) -> int | None:
    """The sum of every ``bytes_sent`` in a daemon's status (None if it reports none)."""
    found: list[int] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "bytes_sent" and isinstance(v, int):
                    found.append(v)
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(status)
    return sum(found) if found else None


def round_stats(peers: list[list[dict[str, Any]]], n: int, work: Path) -> dict[str, Any]:
    """Peer 0's rounds; the global steps at which any peer's round did not gather all n
    (averaged with fewer, alone, or late); how far apart the peers' final weights are."""
    from safetensors.torch import load_file

    rounds = peers[0]
    split = sorted({r["global_step"] for log in peers for r in log
                    if r["members"] < n or not r["averaged"]
                    or r["fraction_averaged"] < 1.0})
    finals = []
    for i in range(n):
        folders = sorted((f for f in work.glob(f"peer{i}/worker/quality/checkpoints/step-*")
                          if f.name.removeprefix("step-").isdigit()),
                         key=lambda f: int(f.name.removeprefix("step-")))
        if folders:
            finals.append(load_file(folders[-1] / "trainable.safetensors"))
    spread = max((float((a[k] - b[k]).abs().max()) for a in finals[:1] for b in finals[1:]
                  for k in a), default=0.0)
    return {"rounds": len(rounds), "averaged": sum(1 for r in rounds if r.get("averaged")),
            "min_members": min((r["members"] for r in rounds), default=0),
            "split_steps": split, "peer_weight_spread": spread,
            "members_by_peer": [[r["members"] for r in log] for log in peers]}


def wait_for_workers(daemons: list[DaemonProcess], deadline: float) -> None:
    while any(d.call("training.status").get("state") not in ("training", "syncing")
              for d in daemons):
        if time.monotonic() > deadline:
            raise RuntimeError("the workers did not start")
        time.sleep(0.2)


def run_swarm(config: Any, train: Path, work: Path, n: int, elements: int,
              byzantine: int | None = None,
              timeout: float = 1800.0,
              then: tuple[int, Any] | None = None,
              ) -> tuple[float, float | None, list[list[dict[str, Any]]]]:
    """n daemons (no worker of their own) and n worker processes, peer i on shard i/n.
    ``then`` = (step, config): the run changes to that config from that global step on, as a
    run owner's second config version does (an owner daemon publishes both).
    Returns (seconds, mean bytes sent per peer or None, every peer's sync log)."""
    work.mkdir(parents=True, exist_ok=True)
    toml = work / "run.toml"
    toml.write_text(config.to_toml())
    daemons: list[DaemonProcess] = []
    workers: list[subprocess.Popen[bytes]] = []
    owner: DaemonProcess | None = None
    try:
        common = ["--no-webui", "--listen", "/ip4/127.0.0.1/tcp/0", "--reachability", "public",
                  "--no-worker"]
        run_args = ["--run-config", str(toml)]
        if then is not None:
            owner = start_daemons([launch_daemon("daemon", common, work / "owner")], 240.0)[0]
            run = owner.call("runconfig.publish", {"toml": config.to_toml()})["run"]
            run_args = ["--run", run, "--bootstrap", owner.addrs[0]]
        for i in range(n):
            args = common + run_args
            if daemons:
                args += ["--bootstrap", daemons[0].addrs[0]]
            # A loaded machine can take more than a minute to start one.
            daemons += start_daemons([launch_daemon("daemon", args, work / f"peer{i}")], 240.0)
        started = time.monotonic()
        for i, daemon in enumerate(daemons):
            head = ([sys.executable, str(BYZANTINE)] if i == byzantine
                    else [sys.executable, "-m", "dandelion_p2p.cli"])
            workers.append(subprocess.Popen(
                [*head, "worker", "--data-dir", str(daemon.data_dir), "--data", str(train),
                 "--shard", f"{i}/{n}", "--no-export"],
                stdout=subprocess.DEVNULL,
                stderr=(daemon.data_dir / "worker.log").open("w"),
            ))
        deadline = started + timeout
        if owner is not None and then is not None:
            # The DHT holds only a run's newest version, and a daemon takes the versions its
            # worker trains under from the first one it reads at the worker's hello on
            # (protocol/runconfig.md section 5): version 2 is published once every worker
            # trains under version 1.
            wait_for_workers(daemons, deadline)
            published = owner.call("runconfig.publish", {"toml": then[1].to_toml(),
                                                         "at_step": then[0]})
            print(f"version 2 in force from step {published['effective_step']}", flush=True)
        for i, w in enumerate(workers):
            if i == byzantine:
                # Banned, it trains alone, each round after the daemon's patience: what it
                # does after the honest peers finished measures nothing.
                continue
            code = w.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0:
                raise RuntimeError(f"worker {i} exited with {code}:\n"
                                   + (daemons[i].data_dir / "worker.log").read_text()[-3000:])
        seconds = time.monotonic() - started
        sent = [_find_bytes(d.call("status")) for d in daemons]
        known = [s for s in sent if s is not None]
        logs = [work / f"peer{i}" / "worker" / "quality" / "sync_log.jsonl" for i in range(n)]
        peers = [[json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
                 for log in logs]
        rounds = peers[0]
        # The daemon's status does not report the averaging's bytes: without them, what a
        # butterfly all-reduce sends per peer and round, 2 (n-1)/n of the vector (of one
        # fragment, streaming) encoded.
        per_round = elements / config.sync.fragments * CODEC_BYTES[config.averaging.codec]
        per_peer = (sum(known) / len(known) if known else
                    len(rounds) * 2 * (n - 1) / n * per_round)
        return seconds, per_peer, peers
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        for d in daemons + ([owner] if owner is not None else []):
            with contextlib.suppress(AssertionError):
                d.stop(timeout=20.0)


# ---------------------------------------------------------------------------- report


def draw_png(results: list[Result], path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h, margin = 900, 560, 60
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    xs = [s for r in results for s, _ in r.curve]
    ys = [v for r in results for _, v in r.curve]
    x0, x1 = 0, max(xs) or 1
    lo, hi = min(ys), max(ys)
    lo, hi = lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9)
    palette = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
               (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127), (23, 190, 207)]

    def px(step: float, value: float) -> tuple[float, float]:
        return (margin + (w - 2 * margin - 200) * (step - x0) / (x1 - x0),
                h - margin - (h - 2 * margin) * (value - lo) / (hi - lo))

    draw.rectangle((margin, margin, w - margin - 200, h - margin), outline="black")
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        _, y = px(0, v)
        draw.text((5, y - 6), f"{v:.4f}", fill="black")
    for k in range(5):
        s = x0 + (x1 - x0) * k / 4
        x, _ = px(s, lo)
        draw.text((x - 10, h - margin + 8), f"{s:.0f}", fill="black")
    draw.text((w // 2 - 150, 20), "validation loss vs global step (equal samples seen)",
              fill="black")
    for i, r in enumerate(results):
        colour = palette[i % len(palette)]
        draw.line([px(s, v) for s, v in r.curve], fill=colour, width=2)
        draw.text((w - margin - 180, margin + 16 * i), f"- {r.name}", fill=colour)
    image.save(path)


def table(results: list[Result], base: float, honest: float | None) -> str:
    """``honest``: the final loss of the honest swarm (gradient-none), which byzantine runs
    are also compared with."""
    lines = ["| run | final val loss | ratio to baseline | ratio to honest swarm | wall s "
             "| bytes sent / peer |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        sent = f"{r.bytes_sent_per_peer / 1e6:.1f} MB" if r.bytes_sent_per_peer else "-"
        to_honest = (f"{r.final / honest:.4f}"
                     if honest is not None and r.name.startswith("byzantine-") else "-")
        lines.append(f"| {r.name} | {r.final:.5f} | {r.final / base:.4f} | {to_honest} "
                     f"| {r.seconds:.0f} | {sent} |")
    return "\n".join(lines)


SAME_BASELINE = ("peers", "batch", "steps", "every", "images", "lr")


def earlier_baseline(args: argparse.Namespace, path: Path) -> Result:
    """The baseline of an earlier run's results.json, if it trained the same computation."""
    earlier = json.loads(path.read_text())
    for key in SAME_BASELINE:
        if key == "every" and earlier["args"].get(key) is None:
            continue
        if earlier["args"].get(key) != str(getattr(args, key)):
            raise SystemExit(f"{path}: its --{key} is {earlier['args'].get(key)}, not "
                             f"{getattr(args, key)}")
    base = next(r for r in earlier["results"] if r["name"] == "baseline")
    return Result("baseline", [(int(s), float(v)) for s, v in base["curve"]], base["seconds"],
                  None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized: 2 peers, a few steps")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2, help="per-peer batch b")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--runs", default="gradient-none,gradient-fp16,gradient-int8,local-H10,"
                   "local-H50,byzantine-centered_clip",
                   help="comma list: gradient-<codec>, local-H<H>, overlap-H<H>, "
                   "stream-H<H>-F<F>, byzantine-<aggregation>")
    p.add_argument("--gather-window", type=float, default=5.0,
                   help="averaging.gather_window: on a loaded machine peers reach a round "
                   "seconds apart, and a peer left alone applies its own gradient")
    p.add_argument("--min-group", type=int, default=0,
                   help="averaging.min_group (0: the number of peers, so that a round never "
                   "forms a smaller group than the whole swarm)")
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--unet-widths", default="32,64",
                   help="channels of the tiny UNet's two levels (64,128: about 4x the "
                   "parameters)")
    p.add_argument("--local-codec", default="none", choices=sorted(CODEC_BYTES),
                   help="averaging.codec of the local-steps runs (local, overlap, stream)")
    p.add_argument("--inner-lr", type=float, default=0.0,
                   help="the peers' inner learning rate in local-steps runs (default --lr, "
                   "the baseline's): e.g. --lr x sqrt(n), Adam's square-root rule for a "
                   "batch n times smaller")
    p.add_argument("--warm-start", default="",
                   help="STEPS:H: local-steps runs sync every H steps with plain averaging "
                   "(outer lr 1, no momentum) up to global step STEPS, then as --runs and "
                   "--outer-* say (a second run config version from STEPS)")
    p.add_argument("--every", type=int, default=0,
                   help="checkpoint (and validate) every this many steps (0: steps // 6); a "
                   "multiple of H validates local-steps runs right after their syncs")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--keep", action="store_true",
                   help="keep the working folder (daemons' and workers' logs)")
    p.add_argument("--baseline-from", type=Path, default=None,
                   help="a results.json of an earlier run with the same --peers, --batch, "
                   "--steps, --every, --images and --lr: its baseline (a deterministic "
                   "computation) is taken instead of trained again")
    args = p.parse_args(argv)
    if args.quick:
        args.peers, args.steps, args.images, args.runs = 2, 6, 40, "gradient-none"
    out = args.out or Path(tempfile.mkdtemp(prefix="quality-"))
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="quality-work-"))
    try:
        from diffusers.utils import logging as diffusers_logging
        from safetensors.torch import load_file
        from transformers.utils import logging as transformers_logging

        from dandelion_p2p.worker.tiny import build_tiny_pipeline

        for lib in (diffusers_logging, transformers_logging):
            lib.disable_progress_bar()
            lib.set_verbosity_error()
        widths = tuple(int(w) for w in args.unet_widths.split(","))
        if len(widths) != 2 or any(w <= 0 or w % 32 for w in widths):
            raise SystemExit("--unet-widths: two multiples of 32, e.g. 64,128")
        model = build_tiny_pipeline(root / "model", unet_widths=(widths[0], widths[1]))
        make_dataset(root / "all", args.images)
        train, val = root / "train", root / "val"
        n_val = max(8, args.images // 10)
        for folder in (train, val):
            folder.mkdir()
        for i, png in enumerate(sorted((root / "all").glob("*.png"))):
            dest = val if i < n_val else train
            shutil.move(png, dest / png.name)
            shutil.move(png.with_suffix(".txt"), dest / png.with_suffix(".txt").name)
        n, b, steps = args.peers, args.batch, args.steps
        every = args.every or max(1, steps // 6)
        common = dict(steps=steps, every=every, lr=args.lr, gather_window=args.gather_window,
                      min_group=args.min_group or max(2, n))
        start = {"unet." + k: v for k, v in
                 load_file(model / "unet" / "diffusion_pytorch_model.safetensors").items()}

        elements = sum(v.numel() for v in start.values())
        base_cfg = run_config(model, batch=n * b, target_batch=n * b, **common)
        validator = Validator(base_cfg, val, root / "val-work")
        results: list[Result] = []
        if args.baseline_from:
            results.append(earlier_baseline(args, args.baseline_from))
            seconds = results[0].seconds
        else:
            seconds = run_baseline(base_cfg, train, root / "baseline")
            results.append(Result("baseline",
                                  validator.curve(root / "baseline" / "worker", start),
                                  seconds, None))
        print(f"baseline: {results[0].final:.5f} in {seconds:.0f} s; curve {results[0].curve}",
              flush=True)
        for name in [x for x in args.runs.split(",") if x]:
            kind, _, arg = name.partition("-")
            byz = None
            then: tuple[int, Any] | None = None
            if kind == "gradient":
                cfg = run_config(model, batch=b, target_batch=n * b, codec=arg, **common)
            elif kind in ("local", "overlap", "stream"):
                inner = {**common, "lr": args.inner_lr or args.lr}
                h, _, f = arg.partition("-")
                cfg = run_config(model, batch=b, mode="local_steps",
                                 local_steps=int(h.removeprefix("H")),
                                 outer_lr=args.outer_lr, outer_momentum=args.outer_momentum,
                                 overlap=kind != "local",
                                 fragments=int(f.removeprefix("F") or 1),
                                 codec=args.local_codec, **inner)
                if args.local_codec != "none":
                    name = f"{name}-{args.local_codec}"
                if args.warm_start:
                    warm_steps, warm_h = (int(x) for x in args.warm_start.split(":"))
                    then = (warm_steps, cfg)
                    cfg = run_config(model, batch=b, mode="local_steps", local_steps=warm_h,
                                     outer_lr=1.0, outer_momentum=0.0, **inner)
                    name = f"{name}-warm{warm_steps}x{warm_h}"
                if args.inner_lr:
                    name = f"{name}-lr{args.inner_lr:g}"
            elif kind == "byzantine":
                cfg = run_config(model, batch=b, target_batch=n * b, aggregation=arg, **common)
                byz = n - 1
            else:
                raise SystemExit(f"unknown run {name}")
            seconds, sent, peers = run_swarm(cfg, train, root / name, n, elements, byz,
                                             then=then)
            work = root / name / "peer0" / "worker" / "quality"
            result = Result(name, validator.curve(work, start), seconds, sent,
                            round_stats(peers, n, root / name))
            results.append(result)
            print(f"{name}: {result.final:.5f} ({result.final / results[0].final:.4f} x "
                  f"baseline) in {seconds:.0f} s; {result.rounds}; curve {result.curve}",
                  flush=True)
        base = results[0].final
        honest = next((r.final for r in results if r.name == "gradient-none"), None)
        (out / "results.json").write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()},
            "results": [{"name": r.name, "curve": r.curve, "final": r.final,
                         "ratio": r.final / base, "seconds": r.seconds,
                         "bytes_sent_per_peer": r.bytes_sent_per_peer, **r.rounds}
                        for r in results]}, indent=1))
        draw_png(results, out / "curves.png")
        print(table(results, base, honest))
        print(f"results in {out}")
        ok = all(math.isfinite(r.final) for r in results)
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
