"""``benchmarks/quality.py --quick`` learns as well through the swarm as on one machine.

Two real daemons on loopback and two real worker processes train the tiny model in gradient
mode with batch b each; one process trains it with batch 2b. At equal samples seen the swarm's
validation loss (fixed noise and timesteps per image) must be within 3 % of the baseline's, and
both must have learned: a change that breaks learning or averaging fails here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import quality


@pytest.mark.slow  # about a minute of two idle cores; the default suite is at its 15-minute limit
def test_quick_gradient_mode_matches_the_baseline(tmp_path: Path) -> None:
    assert quality.main(["--quick", "--out", str(tmp_path)]) == 0
    results = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())
               ["results"]}
    base, swarm = results["baseline"], results["gradient-none"]
    assert base["final"] < 0.9 * base["curve"][0][1], "the baseline did not learn"
    assert abs(swarm["ratio"] - 1.0) <= 0.03, swarm
    assert swarm["averaged"] == swarm["rounds"] > 0 and swarm["min_members"] == 2, swarm
    assert swarm["split_steps"] == [] and swarm["peer_weight_spread"] == 0.0, swarm
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_an_earlier_baseline_is_reused_only_for_the_same_computation(tmp_path: Path) -> None:
    args = argparse.Namespace(peers=4, batch=2, steps=12, every=0, images=160, lr=1e-3)
    curve = [[0, 1.05], [12, 0.35]]
    earlier = tmp_path / "results.json"
    earlier.write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": [{"name": "baseline", "curve": curve, "final": 0.35, "seconds": 10.0}]}))
    base = quality.earlier_baseline(args, earlier)
    assert base.name == "baseline" and base.curve == [(0, 1.05), (12, 0.35)]
    assert base.final == 0.35 and base.seconds == 10.0
    with pytest.raises(SystemExit, match="--steps is 12"):
        quality.earlier_baseline(argparse.Namespace(**{**vars(args), "steps": 24}), earlier)
