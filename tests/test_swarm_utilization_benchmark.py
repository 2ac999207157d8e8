"""A short run of ``benchmarks/swarm_utilization.py``: three daemons in capped namespaces start
their workers, train to the end, and the figures come from the workers' own logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.swarm_utilization import CODEC_BITS, main
from dandelion_p2p.netlab import netlab_unavailable_reason

pytestmark = [pytest.mark.netlab, pytest.mark.slow]


@pytest.mark.timeout(1800)  # minutes on two idle cores, many more on a loaded machine
def test_a_short_run_reports_the_swarms_figures(tmp_path: Path) -> None:
    if (reason := netlab_unavailable_reason()) is not None:
        pytest.skip(f"network lab unavailable: {reason}")
    out = tmp_path / "result.json"
    assert main(["--peers", "3", "--local-steps", "3", "--rounds", "4", "--ratios", "5",
                 "--modes", "blocking", "--images", "8", "--timeout", "400",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (run,) = result["results"]
    assert run["mode"] == "blocking" and run["rounds"] == 4
    assert run["rounds_averaged_min"] >= 3, run
    assert 0.0 < run["utilization_min"] <= run["utilization_median"] <= 1.0
    assert run["swarm_samples_per_s"] > 0 and run["of_solo"] > 0
    # The link rate follows the bound: ratio 5 is a fifth of the ratio-1 rate.
    assert run["link_mbit"] == pytest.approx(result["rate_ratio1_mbit"] / 5, rel=1e-2)
    # A butterfly all-reduce sends 2(n-1)/n of the encoded vector per peer and round: what
    # each peer's link carried is at least that for the rounds it averaged.
    vector_mb = result["elements"] * CODEC_BITS[result["codec"]] / 8e6
    assert run["mb_per_peer_per_round"] >= 0.9 * 4 / 3 * vector_mb * 3 / 4
