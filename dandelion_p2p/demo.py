"""``make demo``: a local swarm on this machine trains a tiny Stable Diffusion model together.

One public relay publishes the run (a tiny random SD 1.x model built here) and serves its
dataset (16 captioned images packed into signed, content-addressed chunks). Two peers behind
NAT join it: they first reach each other through the relay, find the run in the DHT, and
their workers train on chunks leased from the relay with local steps, averaging their
progress through the swarm every few steps. The demo prints each round as it happens and each
peer's web UI login link, and at the end copies the peers' sample images and the exported
model into an output folder (``./demo-output/`` unless ``--output`` says otherwise). It exits
with code 1 when a check fails: both peers must end with bit-identical weights, write sample
images, and export a model that loads back in diffusers.

Where the processes run is ``demo_nat``'s: behind real NATs built from network namespaces
when this machine allows it (root, ip, nft), else on 127.0.0.1 with the NAT simulated (the
peers told they are unreachable, ``--reachability private``), which the demo then says.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dandelion_p2p.control.client import call_sync
from dandelion_p2p.demo_nat import DemoNetwork
from dandelion_p2p.demo_output import (
    OutputFolderError,
    check_login,
    keep_results,
    login_link,
    prepare_output,
    write_summary,
)

LOCAL_STEPS = 4
CHECKPOINT_EVERY = 3 * LOCAL_STEPS
"""A boundary that is also a checkpoint step waits for its round; the others train on while
their round is averaged (overlapped rounds, the default)."""
MAX_STEPS = 24


class Proc:
    def __init__(self, name: str, args: list[str], data_dir: Path, net: DemoNetwork) -> None:
        self.name = name
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.out = data_dir / "stdout.log"
        self.err = data_dir / "daemon.log"
        argv = [sys.executable, "-m", "dandelion_p2p.cli", *args, "--data-dir", str(data_dir)]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = net.popen(name, argv, out, err)
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
                raise SystemExit(f"{self.name} exited early:\n{self.err.read_text()[-3000:]}")
            time.sleep(0.1)
        raise SystemExit(f"{self.name} did not start within {timeout} s")

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return call_sync(self.data_dir / "control.sock", method, params, timeout=30.0)

    def stop(self) -> float:
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return time.monotonic() - start


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            break  # a line still being written
    return out


def final_weights_mismatch(work_dirs: dict[str, Path]) -> str | None:
    """None when every worker's newest checkpoint is of the same step and holds bit-identical
    trained weights; otherwise what differs."""
    import torch
    from safetensors.torch import load_file

    finals: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
    for name, work in work_dirs.items():
        steps = {int(f.name.removeprefix("step-")): f for f in work.glob("checkpoints/step-*")
                 if f.name.removeprefix("step-").isdigit()}
        if not steps:
            return f"{name} has no checkpoint"
        newest = max(steps)
        finals[name] = (newest, load_file(steps[newest] / "trainable.safetensors"))
    (first, (step, weights)), *others = finals.items()
    for name, (other_step, other_weights) in others:
        if other_step != step:
            return f"{first} ended at step {step}, {name} at step {other_step}"
        if set(other_weights) != set(weights):
            return f"{first} and {name} trained different tensors"
        differ = [k for k in weights if not torch.equal(weights[k], other_weights[k])]
        if differ:
            return (f"{first} and {name} hold different weights at step {step} in "
                    f"{len(differ)} of {len(weights)} tensors ({', '.join(differ[:3])})")
    return None


def short(peer_id: str) -> str:
    return f"{peer_id[:8]}…{peer_id[-4:]}"


def write_run_config(path: Path, model: Path, manifest: str) -> None:
    path.write_text(f'''name = "demo"

[model]
base = "{model}"
family = "sd1"

[training]
method = "full"
resolution = 64
bucket_min = 64
bucket_max = 128
batch_size = 2
max_steps = {MAX_STEPS}
seed = 7
min_snr_gamma = 5.0
sample_every = {MAX_STEPS}
sample_prompts = ["a red cat", "a green tree by the sea"]
sample_steps = 4

[optimizer]
name = "adamw"
lr = 0.001

[schedule]
name = "constant_with_warmup"
warmup_steps = 4

[sync]
mode = "local_steps"
local_steps = {LOCAL_STEPS}
outer_lr = 0.7
outer_momentum = 0.9

[averaging]
codec = "none"
gather_window = 1.0
chunk_timeout = 10.0

[checkpoint]
every_steps = {CHECKPOINT_EVERY}
keep_last = 2

[dataset]
manifest = "{manifest}"
lease_seconds = 60.0
''')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true",
                        help="keep the demo's working folder (logs, data dirs)")
    parser.add_argument("--output", type=Path, default=Path("demo-output"),
                        help="where the sample images and the exported model go "
                             "(default: ./demo-output)")
    parser.add_argument("--nat", choices=("auto", "real", "simulated"), default="auto",
                        help="put the peers behind real NATs (network namespaces; needs root "
                             "and ip/nft), or simulate them on 127.0.0.1 (auto: real when "
                             "possible)")
    args = parser.parse_args()
    # SIGTERM (a timeout, a supervisor) unwinds through the finally below like Ctrl-C does, so
    # the daemons and the network namespaces go with the demo instead of living on.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        output = prepare_output(args.output)
    except OutputFolderError as exc:
        raise SystemExit(f"demo: {exc}") from None
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="dandelion-demo-"))
    procs: list[Proc] = []
    net, why = DemoNetwork.open(args.nat)
    try:
        from dandelion_p2p.worker.quiet import quiet_third_party

        quiet_third_party()  # before diffusers imports bitsandbytes
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        from dandelion_p2p.worker.tiny import build_tiny_pipeline, write_images

        for lib in (diffusers_logging, transformers_logging):
            lib.set_verbosity_error()

        print("Building a tiny random Stable Diffusion 1.x model and 16 captioned images")
        model = build_tiny_pipeline(root / "model")
        # Uncompressed PNGs (~49 KB): four to a chunk, so the two peers share four chunks.
        write_images(root / "images", 16, size=(128, 128), compress_level=0)
        print("Packing them into chunks signed by the relay's key: dandelion-p2p dataset pack "
              "images packed --chunk-size 200k --data-dir relay")
        packed = subprocess.run(
            [sys.executable, "-m", "dandelion_p2p.cli", "dataset", "pack", str(root / "images"),
             str(root / "packed"), "--chunk-size", "200k", "--data-dir", str(root / "relay")],
            capture_output=True, text=True, check=True,
        ).stdout
        manifest = packed.rsplit('manifest = "', 1)[1].split('"', 1)[0]
        print("  " + packed.strip().splitlines()[0])
        run_toml = root / "run.toml"
        write_run_config(run_toml, model, manifest)

        print("Starting a public relay that publishes the run and serves its dataset: "
              "dandelion-p2p daemon --relay --dataset packed --run-config run.toml --no-worker")
        relay = Proc("relay", ["daemon", "--relay", "--no-worker", "--no-webui",
                               "--dataset", str(root / "packed"), "--run-config", str(run_toml),
                               "--listen", net.relay_listen()], root / "relay", net)
        procs.append(relay)
        relay.wait_ready()
        print(f"  relay {short(relay.peer_id)} at {relay.addrs[0]} ({net.describe('relay')})")
        run_id = ""
        deadline = time.monotonic() + 30
        while not run_id and time.monotonic() < deadline:
            runs = relay.call("runs.list")["runs"]
            run_id = next((r["run"] for r in runs if r["name"] == "demo"), "")
            time.sleep(0.5)
        if not run_id:
            raise SystemExit("the relay did not publish the run")
        print(f"  run {run_id} published in the DHT, signed by the relay's key")

        peers = []
        problems: list[str] = []
        # Both start at once: each needs only the relay, and neither trains before the other
        # is there to average with.
        for name in ("alice", "bob"):
            net.add_peer(name)
            flags = " ".join(net.peer_args()[:2]) if not net.real else "(behind a real NAT)"
            print(f"Starting {name}: dandelion-p2p join <relay> --run {run_id} {flags}")
            p = Proc(name, ["join", relay.addrs[0], *net.peer_args(), "--run", run_id,
                            "--webui-port", "0"], root / name, net)
            procs.append(p)
            peers.append(p)
        for p in peers:
            name = p.name
            p.wait_ready()
            status = p.call("status")
            url = net.browser_url(name, status.get("webui", {}).get("url", "off"))
            print(f"  {name} {short(p.peer_id)} at {net.describe(name)}: "
                  f"{'reachable' if status['reachable'] else 'not reachable'} from outside, "
                  f"{len(status['relay_reservations'])} relay reservation(s)")
            link = login_link(root / name, url)
            print(f"  {name}'s web UI while the demo runs: {link or url}")
            if (trouble := check_login(link) if link else "no web UI") is not None:
                problems.append(f"{name}'s web UI: {trouble}")
            if status["reachable"] or not status["relay_reservations"]:
                problems.append(f"{name} behind NAT is reachable or holds no relay reservation")
        if net.real:
            print(f"  Real NATs ({why}): the peers' routers masquerade their traffic and drop "
                  "what nobody inside asked for; the peers learnt by dial-back from the relay "
                  "that they cannot be reached, and first reach each other through it (hole "
                  "punching may then connect them directly).")
        else:
            print(f"  The NAT is simulated ({why}): all three processes listen on 127.0.0.1 "
                  "and the two peers are told they are unreachable, so they reserve a slot on "
                  "the relay, advertise relayed addresses and first reach each other through "
                  "it; the loopback interface itself blocks nothing.")

        print(f"\nTraining: every {LOCAL_STEPS} local steps an averaging round with the other "
              f"peer, averaged while the next steps train, until global step {MAX_STEPS}")
        logs = {p.name: root / p.name / "worker" / "demo" for p in peers}
        printed: dict[str, int] = {p.name: 0 for p in peers}
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            states = {p.name: p.call("training.status") for p in peers}
            for name in printed:
                rounds = read_jsonl(logs[name] / "sync_log.jsonl")
                for entry in rounds[printed[name]:]:
                    step = entry.get("boundary", entry["global_step"])
                    applied = ("" if step == entry["global_step"]
                               else f", applied at step {entry['global_step']}")
                    print(f"  {name}: round {entry['round']} of step {step}{applied}: "
                          f"{entry['members']} peers, "
                          f"{100 * entry['fraction_averaged']:.0f}% averaged in "
                          f"{entry['seconds']:.1f} s, weights {entry.get('digest', '?')[:12]}")
                printed[name] = len(rounds)
                if states[name]["state"] == "crashed":
                    raise SystemExit(f"{name}'s worker crashed: {states[name]['detail']}")
            if all(st["state"] == "stopped" for st in states.values()):
                break
            time.sleep(1.0)
        else:
            raise SystemExit("training did not finish within 15 minutes")
        problems += [f"{p.name}'s worker ended as {st['state']}: {st.get('detail', '')}"
                     for p in peers if (st := p.call("training.status"))["state"] != "stopped"]

        print("\nResult:")
        links = {c["peer_id"]: c.get("connection", "?")
                 for c in peers[0].call("status")["connected_peers"]}
        print(f"  {peers[0].name} and {peers[1].name} are connected "
              f"{links.get(peers[1].peer_id, 'not at all now')} (relayed: through the relay; "
              "direct: hole punching got through)")
        for name, folder in logs.items():
            losses = [e["loss"] for e in read_jsonl(folder / "train_log.jsonl")]
            k = max(1, len(losses) // 4)
            print(f"  {name}: {len(losses)} steps; mean loss of the first {k} "
                  f"{sum(losses[:k]) / k:.4f}, of the last {k} {sum(losses[-k:]) / k:.4f}")
        digests = [{e["round"]: e.get("digest") for e in read_jsonl(f / "sync_log.jsonl")}
                   for f in logs.values()]
        shared = sorted(set(digests[0]) & set(digests[1]))
        same = [r for r in shared if digests[0][r] is not None and digests[0][r] == digests[1][r]]
        print(f"  after {len(same)} of {len(shared)} rounds both peers held bit-identical "
              "weights")
        mismatch = final_weights_mismatch(logs)
        print(f"  final weights: {mismatch or 'bit-identical on both peers'}")
        if mismatch:
            problems.append(f"the peers' final weights differ: {mismatch}")
        book = relay.call("dataset.status")
        print(f"  the relay's lease book: {book['chunks']} chunks, {book['leases_granted']} "
              f"leases granted, {book['receipts']} signed receipts; epoch {book['epoch']} has "
              f"{book['completed']} of {book['chunks']} chunks done, "
              f"{book['active_leases']} leased (peers that stop partway into a chunk leave "
              "its lease to expire)")

        if book["receipts"] < 1:
            problems.append("the relay's lease book holds no signed receipt")

        print("\nShutting down (SIGTERM):")
        for p in reversed(procs):
            print(f"  {p.name} stopped in {p.stop():.2f} s (exit code {p.proc.returncode})")
            if p.proc.returncode != 0:
                problems.append(f"{p.name} exited with code {p.proc.returncode}")

        kept, kept_problems = keep_results(output, logs)
        problems += kept_problems
        summary = write_summary(output, {
            "run": run_id, "max_steps": MAX_STEPS, "local_steps": LOCAL_STEPS,
            "rounds_identical": len(same), "rounds": len(shared), "final_weights": mismatch
            or "bit-identical", "nat": f"{'real' if net.real else 'simulated'}: {why}",
            "problems": problems, "seconds": round(time.monotonic() - started, 1), **kept,
        })
        print(f"\nKept in {output}:")
        for name, images in kept["samples"].items():
            print(f"  samples/{name}/: {len(images)} sample images from the final weights")
        if kept["model"]:
            print(f"  model/: {kept['model']['from']}'s export ({kept['model']['export']}): "
                  "a diffusers folder (StableDiffusionPipeline.from_pretrained(\"" +
                  str(output / "model" / "diffusers") + "\")) and a single .safetensors file")
        print(f"  {summary.name}: what was checked")
        if problems:
            args.keep = True
            raise SystemExit("demo failed:\n" + "\n".join(f"  - {x}" for x in problems))
        print(f"\nAll checks passed in {time.monotonic() - started:.0f} s.")
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        net.close()
        if args.keep:
            print(f"demo folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
