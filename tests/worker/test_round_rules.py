"""Which local-steps rounds take an outer step (``round_rules``), in the blocking and the
overlapped mode alike: only a round that averaged this peer's whole vector moves the global
weights G. A round averaged in part, one the group finished without this peer, one that
failed as a whole or one cut short by a stopping daemon leaves G as it was on every member
(the members of such a round saw the same failure), so the members stay bit-identical."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dandelion_p2p.worker.link import SoloLink, SyncOutcome
from dandelion_p2p.worker.round_rules import OuterRule, outer_rule
from dandelion_p2p.worker.train import Trainer, WorkerOptions
from tests.worker.runconfigs import tiny_run

FULL = SyncOutcome(0, True, 1.0, 3, 0.1)
PARTIAL = SyncOutcome(0, True, 2 / 3, 3, 0.1)
LEFT_OUT = SyncOutcome(0, False, 0.0, 3, 0.1)
BEHIND = SyncOutcome(0, False, 0.0, 1, 0.1, behind=True)
STOPPING = SyncOutcome(0, False, 0.0, 1, 0.0, stopping=True)
ALONE = SyncOutcome(0, False, 0.0, 1, 0.1)


@pytest.mark.parametrize(("outcome", "outer_step_alone", "rule"), [
    (FULL, False, OuterRule.STEP),
    (PARTIAL, False, OuterRule.NONE),
    (PARTIAL, True, OuterRule.NONE),
    (LEFT_OUT, False, OuterRule.NONE),
    (BEHIND, True, OuterRule.NONE),
    (STOPPING, True, OuterRule.NONE),
    (ALONE, False, OuterRule.ALONE),
    (ALONE, True, OuterRule.STEP),
])
def test_only_a_round_averaged_in_full_takes_the_swarms_outer_step(
    outcome: SyncOutcome, outer_step_alone: bool, rule: OuterRule
) -> None:
    assert outer_rule(outcome, outer_step_alone) is rule


class ReportedRounds(SoloLink):
    """The trainer's side of a swarm whose rounds ended as ``reported`` says (by round): the
    rule is the trainer's, whatever the daemon averaged. The buffer is left as the worker
    wrote it, as a round alone leaves it."""

    def __init__(self, run_config: Path, reported: dict[int, SyncOutcome]) -> None:
        super().__init__(run_config)
        self.reported = reported

    def sync(self, round_: int, weight: float, kind: str, *,
             span: tuple[int, int] | None = None) -> SyncOutcome:
        return dataclasses.replace(self.reported.get(round_, FULL), round=round_)


def digests(work: Path) -> dict[int, str]:
    with (work / "sync_log.jsonl").open() as log:
        return {e["round"]: e["digest"] for e in map(json.loads, log)}


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
@pytest.mark.parametrize("failed", [PARTIAL, LEFT_OUT, STOPPING],
                         ids=["partial", "left-out", "stopping"])
def test_a_round_applied_by_no_peer_leaves_the_global_weights_as_they_were(
    overlap: bool, failed: SyncOutcome, tiny_sd1: Path, images: Path, tmp_path: Path
) -> None:
    config = tiny_run(tiny_sd1, training={"max_steps": 4},
                      sync={"local_steps": 1, "overlap": overlap},
                      checkpoint={"every_steps": 100})
    toml = tmp_path / "run.toml"
    toml.write_text(config.to_toml())
    work = tmp_path / "work"
    trainer = Trainer(config, WorkerOptions(data=images, work_dir=work, export=False,
                                            device="cpu"), ReportedRounds(toml, {2: failed}))
    trainer.resume()
    try:
        trainer.run()
    finally:
        trainer.close()
    g = digests(work)
    assert g[2] == g[1], "the failed round moved G"
    # Every round is taken part in: a peer sent to catch up that finds no newer state still
    # starts the round of the boundary it stands at (the others average it without it).
    assert sorted(g) == [1, 2, 3, 4]
    assert g[3] != g[2], "the next full round moves G again"
