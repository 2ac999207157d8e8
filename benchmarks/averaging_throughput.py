"""Averaging throughput: N peer processes run all-reduce rounds; compared in the same run with
the same byte pattern moved over plain TCP (``raw_butterfly.py``).

    python benchmarks/averaging_throughput.py --peers 4 --size-mb 100 --compression none
    python benchmarks/averaging_throughput.py --peers 4 --size-mb 100 --netlab 100mbit
    python benchmarks/averaging_throughput.py --peers 4 --size-mb 10 \
        --hivemind .venv-hivemind/bin/python

Reported per configuration: seconds per round (median; the all-reduce itself, and the whole
round including DHT matchmaking), MB/s per peer, CPU seconds per round, peak RSS per peer, the
raw-TCP seconds and the ratio. With ``--netlab RATE`` every peer is a host in its own network
namespace with its links capped at RATE, and the table adds the ratio to the lower bound
2(n-1)/n * S / B. ``--netlab`` needs root. ``--hivemind PYTHON`` also runs hivemind's rounds
(``hivemind_rounds.py`` under that interpreter) with the same peers, size, rounds, window and
pause on loopback, after ours, and adds their medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import environment, format_table, median, write_json
from benchmarks.averaging_cluster import Launcher, start_cluster

RAW_SCRIPT = Path(__file__).with_name("raw_butterfly.py")
HIVEMIND_SCRIPT = Path(__file__).with_name("hivemind_rounds.py")


def hivemind_medians(python: str, args: argparse.Namespace) -> dict[str, Any]:
    """hivemind's medians over peers and rounds (the first round not counted, as ours)."""
    out = subprocess.run(
        [python, str(HIVEMIND_SCRIPT), "--peers", str(args.peers), "--size-mb", str(args.size_mb),
         "--rounds", str(args.rounds), "--gather", str(args.gather), "--pause", str(args.pause)],
        capture_output=True, text=True, timeout=args.rounds * (120 + args.size_mb), check=True)
    rounds = [r for peer in json.loads(out.stdout.splitlines()[-1])["rounds"] for r in peer[1:]]
    return {
        "hivemind_allreduce_s_median": median([r["allreduce_s"] for r in rounds]),
        "hivemind_round_s_median": median([r["round_s"] for r in rounds]),
        "hivemind_min_group": min((r["group"] for r in rounds), default=0),
    }


def parse_rate(text: str) -> float:
    """'100mbit' -> megabits per second."""
    t = text.lower().strip()
    for suffix, scale in (("gbit", 1000.0), ("mbit", 1.0), ("kbit", 0.001)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * scale
    return float(t)


def raw_seconds(n: int, size: int, launchers: list[Launcher] | None, ips: list[str]) -> float:
    procs = []
    try:
        endpoints = []
        for i in range(n):
            argv = [sys.executable, str(RAW_SCRIPT), "--ip", ips[i], "--size", str(size)]
            kwargs: dict[str, Any] = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            proc = launchers[i].popen(argv, **kwargs) if launchers else subprocess.Popen(
                argv, **kwargs
            )
            procs.append(proc)
            assert proc.stdout is not None
            endpoints.append(f"{ips[i]}:{proc.stdout.readline().split()[1]}")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(" ".join(endpoints) + "\n")
            proc.stdin.flush()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        times = []
        for proc in procs:
            assert proc.stdout is not None
            times.append(float(proc.stdout.readline().split()[1]))
            proc.wait(timeout=60)
        return max(times)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n = args.peers
    size_bytes = int(args.size_mb * 1_000_000)
    elements = size_bytes // 4
    launchers: list[Launcher] | None = None
    ips = ["127.0.0.1"] * n
    lab_cm: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    rate = parse_rate(args.netlab) if args.netlab else None
    if rate is not None:
        from dandelion_p2p.netlab import NetLab, netlab_unavailable_reason

        reason = netlab_unavailable_reason()
        if reason:
            raise SystemExit(f"--netlab needs the network lab: {reason}")
        lab_cm = NetLab()
    with lab_cm as lab:
        if lab is not None:
            hosts = [lab.add_public_host(f"p{i}", up_mbit=rate, down_mbit=rate) for i in range(n)]
            launchers = list(hosts)
            ips = [h.ip for h in hosts]
        raw = raw_seconds(n, size_bytes, launchers, ips)
        cluster = start_cluster(
            n, workdir, size=elements, rounds=args.rounds, launchers=launchers, ips=ips,
            extra=["--codec", args.compression, "--chunk-elements", str(args.chunk_elements),
                   "--gather", str(args.gather), "--chunk-timeout", str(args.chunk_timeout),
                   *(["--wait-window"] if args.wait_window else []), "--pause", str(args.pause)],
        )
        try:
            cluster.go()
            cluster.wait(args.rounds * (60 + args.size_mb))
            results = [p.results() for p in cluster.peers]
        finally:
            cluster.stop()
    rows = []
    for peer_results in results:
        for entry in peer_results[1:]:  # the first round also opens every connection
            report = entry.get("report")
            if report is None:
                continue
            allreduce_s = report["finished_at"] - report["started_at"]
            rows.append(
                {
                    "allreduce_s": allreduce_s,
                    "round_s": entry["seconds"],
                    # What the round spent outside the all-reduce: matchmaking, mostly.
                    "matchmaking_s": entry["seconds"] - allreduce_s,
                    "cpu_s": entry["cpu_seconds"],
                    "rss_mb": entry["peak_rss_mb"],
                    "fraction": report["fraction_averaged"],
                }
            )
    allreduce = median([r["allreduce_s"] for r in rows])
    summary: dict[str, Any] = {
        "peers": n,
        "size_mb": args.size_mb,
        "compression": args.compression,
        "gathering": "whole window" if args.wait_window else "ends early",
        "rounds_measured": len(rows) // max(n, 1),
        "allreduce_s_median": allreduce,
        "round_s_median": median([r["round_s"] for r in rows]),
        "matchmaking_s_median": median([r["matchmaking_s"] for r in rows]),
        "mb_per_s_per_peer": args.size_mb / allreduce if allreduce else None,
        "cpu_s_per_round": median([r["cpu_s"] for r in rows]),
        "peak_rss_mb": max((r["rss_mb"] for r in rows), default=None),
        "min_fraction_averaged": min((r["fraction"] for r in rows), default=None),
        "raw_tcp_s": raw,
        "ratio_to_raw_tcp": allreduce / raw if raw else None,
    }
    if args.hivemind:
        if rate is not None:
            raise SystemExit("--hivemind runs on loopback only")
        summary.update(hivemind_medians(args.hivemind, args))
    if rate is not None:
        bound = 2 * (n - 1) / n * size_bytes * 8 / (rate * 1e6)
        summary["netlab_rate_mbit"] = rate
        summary["bound_s"] = bound
        summary["fraction_of_bound"] = bound / allreduce if allreduce else None
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--size-mb", type=float, default=100.0)
    p.add_argument("--compression", default="none",
                   choices=["none", "fp16", "bf16", "int8", "int4", "int2"])
    p.add_argument("--rounds", type=int, default=6, help="the first is not counted")
    p.add_argument("--chunk-elements", type=int, default=1 << 20)
    p.add_argument("--chunk-timeout", type=float, default=30.0)
    p.add_argument("--gather", type=float, default=1.0)
    p.add_argument("--pause", type=float, default=0.0,
                   help="seconds each peer waits between its rounds (the local steps)")
    p.add_argument("--wait-window", action="store_true",
                   help="every round waits the whole gather window (matchmaking before it "
                        "could end early), for comparison")
    p.add_argument("--netlab", default="", help="cap every link, e.g. 100mbit (needs root)")
    p.add_argument("--hivemind", default="",
                   help="a Python with hivemind installed: run its rounds too, for comparison")
    p.add_argument("--json", default=None)
    p.add_argument("--keep", default="",
                   help="keep every peer's log and results in this folder (it must not exist)")
    args = p.parse_args()
    if args.keep and Path(args.keep).exists():
        raise SystemExit(f"{args.keep} exists")
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="avg-bench-"))
    try:
        summary = run(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    headers = ["peers", "MB", "codec", "gathering", "s/round (all-reduce)",
               "s/round (with matchmaking)", "round - all-reduce", "MB/s/peer", "CPU s/round",
               "peak RSS MB", "raw TCP s", "ratio to raw"]
    row = [summary["peers"], summary["size_mb"], summary["compression"], summary["gathering"],
           summary["allreduce_s_median"], summary["round_s_median"],
           summary["matchmaking_s_median"],
           summary["mb_per_s_per_peer"], summary["cpu_s_per_round"], summary["peak_rss_mb"],
           summary["raw_tcp_s"], summary["ratio_to_raw_tcp"]]
    if "hivemind_round_s_median" in summary:
        headers += ["hivemind all-reduce", "hivemind round"]
        row += [summary["hivemind_allreduce_s_median"], summary["hivemind_round_s_median"]]
    if "bound_s" in summary:
        headers += ["bound s", "fraction of bound"]
        row += [summary["bound_s"], summary["fraction_of_bound"]]
    print(format_table(headers, [row]))
    path = write_json("averaging_throughput", {"environment": environment(), **summary}, args.json)
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
