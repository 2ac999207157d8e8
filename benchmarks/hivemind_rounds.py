"""hivemind's averaging rounds, timed as ``averaging_throughput.py`` times ours, for a
comparison in the same run. Runs under an interpreter that has hivemind (never our .venv: its
pins differ), e.g.:

    python -m venv .venv-hivemind
    .venv-hivemind/bin/pip install torch==2.13.0 hivemind==1.1.12
    .venv-hivemind/bin/python benchmarks/hivemind_rounds.py --peers 4 --size-mb 10

N peer processes on loopback, each a hivemind DHT (peer 0 the others' bootstrap) and a
``DecentralizedAverager`` of one float32 tensor with ``target_group_size`` = N, so that a group
forms as soon as all N have found each other, and ``min_matchmaking_time`` = the gathering
window. Every round is a ``step(require_trigger=True)``: matchmaking runs until the group is
assembled (stage ``AWAITING_TRIGGER``), then the trigger starts the all-reduce. Timed per peer
and round: the whole step (``round_s``) and from the trigger to the result
(``allreduce_s``). Peers wait ``--pause`` seconds between rounds. Prints one JSON object
(``rounds``: a list per peer) on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any


def child(args: argparse.Namespace) -> None:
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage

    initial = [line for line in [sys.stdin.readline().strip()] if line]
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                       initial_peers=initial)
    print("maddr", str(dht.get_visible_maddrs()[0]), flush=True)
    elements = int(args.size_mb * 1_000_000) // 4
    tensor = torch.randn(elements, generator=torch.Generator().manual_seed(args.index))
    averager = hivemind.DecentralizedAverager(
        [tensor], dht, start=True, prefix="bench", target_group_size=args.peers,
        min_group_size=args.peers, min_matchmaking_time=args.gather,
        request_timeout=args.gather / 2)
    assert sys.stdin.readline().strip() == "go"
    rounds: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        control = averager.step(wait=False, require_trigger=True, timeout=120)
        while control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP):
            time.sleep(0.001)
        triggered = time.perf_counter()
        control.allow_allreduce()
        group = control.result(timeout=300)
        done = time.perf_counter()
        rounds.append({"round_s": done - started, "allreduce_s": done - triggered,
                       "group": len(group) if group else 0})
        time.sleep(args.pause)
    print("rounds", json.dumps(rounds), flush=True)
    averager.shutdown()
    dht.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--size-mb", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--gather", type=float, default=1.0)
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--index", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.index >= 0:
        child(args)
        return
    procs: list[subprocess.Popen[str]] = []
    try:
        bootstrap = ""
        for i in range(args.peers):
            argv = [sys.executable, __file__, "--index", str(i), "--peers", str(args.peers),
                    "--size-mb", str(args.size_mb), "--rounds", str(args.rounds),
                    "--gather", str(args.gather), "--pause", str(args.pause)]
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True)
            procs.append(proc)
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(bootstrap + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline().split()
            if not line or line[0] != "maddr":
                raise SystemExit(f"hivemind peer {i} did not start")
            bootstrap = bootstrap or line[1]
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("rounds "):
                    results.append(json.loads(line.removeprefix("rounds ")))
                    break
        print(json.dumps({"peers": args.peers, "size_mb": args.size_mb, "rounds": results}))
    finally:
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
