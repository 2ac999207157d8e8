"""A peer the others left behind (they finished a round without it) waits for their state
instead of training on from its own: averaging with them from other start weights would keep
it one outer step apart from them for good (``joining.catch_up_and_join``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from dandelion_p2p.worker import joining
from dandelion_p2p.worker.checkpoint import CheckpointStore
from dandelion_p2p.worker.link import SyncOutcome
from dandelion_p2p.worker.train import Trainer, WorkerOptions
from tests.worker.runconfigs import tiny_run
from tests.worker.test_round_rules import ReportedRounds

LEFT_BEHIND = SyncOutcome(0, False, 0.0, 3, 0.1, left_behind=True)


class SwarmWritesLater(ReportedRounds):
    """Round 2 finished without this peer; the others' checkpoint of ``offered`` (a folder)
    is offered from the ``offer_from``-th catch-up on (never when None). ``stop_after``:
    the daemon asks the worker to stop once that many catch-ups were asked."""

    def __init__(self, run_config: Path, offered: Path | None, offer_from: int,
                 stop_after: int | None = None) -> None:
        super().__init__(run_config, {2: LEFT_BEHIND})
        self.offered = offered
        self.offer_from = offer_from
        self.stop_after = stop_after
        self.asked: list[int] = []

    def catch_up(self, have_step: int, checkpoints: Path, wait: bool = False,
                 leave_out: Sequence[str] = ()) -> int:
        self.asked.append(have_step)
        if self.offered is None or len(self.asked) < self.offer_from:
            return -1
        step = int(self.offered.name.removeprefix("step-"))
        if step <= have_step:
            return -1
        shutil.copytree(self.offered, checkpoints / self.offered.name)
        return step

    def progress(self, fields: dict[str, object], force: bool = False) -> bool:
        return self.stop_after is not None and len(self.asked) >= self.stop_after


def trainer_for(tmp_path: Path, name: str, tiny_sd1: Path, images: Path,
                link_for: Callable[[Path], ReportedRounds] | None = None,
                overlap: bool | None = None) -> Trainer:
    """A resumed trainer of 4 steps, H = 1, a checkpoint every 2 steps, whose link
    ``link_for`` makes from the run config's path (default: every round averaged in full);
    ``overlap``: ``sync.overlap`` (None: the default, overlapped rounds)."""
    sync: dict[str, Any] = {"local_steps": 1}
    if overlap is not None:
        sync["overlap"] = overlap
    config = tiny_run(tiny_sd1, training={"max_steps": 4}, sync=sync,
                      checkpoint={"every_steps": 2, "keep_last": 4})
    toml = tmp_path / f"{name}.toml"
    toml.write_text(config.to_toml())
    link = link_for(toml) if link_for is not None else ReportedRounds(toml, {})
    trainer = Trainer(config, WorkerOptions(data=images, work_dir=tmp_path / name,
                                            export=False, device="cpu"), link)
    trainer.resume()
    return trainer


def late_peer(tmp_path: Path, name: str, tiny_sd1: Path, images: Path,
              overlap: bool | None = None, **link_args: Any
              ) -> tuple[Trainer, SwarmWritesLater]:
    """``trainer_for`` with a ``SwarmWritesLater`` link of ``link_args``, and that link."""
    trainer = trainer_for(tmp_path, name, tiny_sd1, images,
                          lambda toml: SwarmWritesLater(toml, **link_args), overlap)
    assert isinstance(trainer.link, SwarmWritesLater)
    return trainer, trainer.link


def trained_steps(work: Path) -> list[int]:
    with (work / "train_log.jsonl").open() as log:
        return [e["step"] for e in map(json.loads, log)]


def run(trainer: Trainer) -> None:
    try:
        trainer.run()
    finally:
        trainer.close()


@pytest.fixture
def swarm_state(tmp_path: Path, tiny_sd1: Path, images: Path) -> Path:
    """The others' checkpoint of step 2: a peer that applied round 2."""
    others = trainer_for(tmp_path, "others", tiny_sd1, images)
    run(others)
    return tmp_path / "others" / "checkpoints" / "step-00000002"


def test_a_peer_left_behind_waits_for_the_others_state_and_joins_with_it(
    swarm_state: Path, tmp_path: Path, tiny_sd1: Path, images: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(joining, "WAIT_POLL", 0.05)
    trainer, link = late_peer(tmp_path, "late", tiny_sd1, images,
                              offered=swarm_state, offer_from=4)
    run(trainer)
    # Asked at start (nothing yet), then again and again after round 2 until it came; never
    # with a checkpoint of its own at step 2, which would have hidden the others'.
    assert link.asked[0] == -1 and len(link.asked) == 4
    assert all(have < 2 for have in link.asked)
    mine = CheckpointStore(tmp_path / "late" / "checkpoints", keep_last=4)
    assert (mine.root / swarm_state.name / "trainable.safetensors").read_bytes() == (
        swarm_state / "trainable.safetensors").read_bytes(), "its own step 2 hid the others'"
    # Steps 1 and 2, nothing while it waited, then round 3 taken as a joiner and step 4.
    assert trained_steps(tmp_path / "late") == [1, 2, 4]
    with (tmp_path / "late" / "sync_log.jsonl").open() as log:
        assert [e["round"] for e in map(json.loads, log) if e.get("left_behind")] == [2]


def test_a_peer_left_behind_trains_on_alone_when_no_state_comes(
    tmp_path: Path, tiny_sd1: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(joining, "WAIT_POLL", 0.05)
    monkeypatch.setattr(joining, "MIN_WAIT", 0.3)
    trainer, link = late_peer(tmp_path, "late", tiny_sd1, images, offered=None, offer_from=0)
    run(trainer)
    assert len(link.asked) > 2, "it did not wait for the others' state"
    assert trained_steps(tmp_path / "late") == [1, 2, 3, 4]
    assert CheckpointStore(tmp_path / "late" / "checkpoints", keep_last=4).latest_step() == 4


def test_a_peer_stopped_while_left_behind_saves_no_state_the_others_lack(
    swarm_state: Path, tmp_path: Path, tiny_sd1: Path, images: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(joining, "WAIT_POLL", 0.05)
    trainer, _ = late_peer(tmp_path, "late", tiny_sd1, images,
                           offered=swarm_state, offer_from=100, stop_after=3)
    run(trainer)
    assert trained_steps(tmp_path / "late") == [1, 2]
    # Step 2 of its own would hold the start weights the others left behind, and would hide
    # their step 2 from its catch-up after a restart.
    assert CheckpointStore(tmp_path / "late" / "checkpoints", keep_last=4).latest_step() < 2


@pytest.mark.parametrize(("overlap", "trained"), [(False, [1]), (True, [1, 2])],
                         ids=["blocking", "overlap"])
def test_a_peer_averaging_alone_looks_for_a_newer_state_and_joins_it(
    tmp_path: Path, tiny_sd1: Path, images: Path, monkeypatch: pytest.MonkeyPatch,
    overlap: bool, trained: list[int],
) -> None:
    """Alone in round 1 (the others' announcements of it expired long ago, say): it asks
    whether the others are ahead, and takes their state of step 4. Overlapped, round 1 is
    applied (and found alone) at step 2's boundary, one step later."""
    others = trainer_for(tmp_path, "others", tiny_sd1, images)
    run(others)
    monkeypatch.setattr(joining, "LOOK_AHEAD_EVERY", 0.0)
    trainer, link = late_peer(tmp_path, "alone", tiny_sd1, images,
                              offered=tmp_path / "others" / "checkpoints" / "step-00000004",
                              offer_from=2, overlap=overlap)
    link.reported = {1: SyncOutcome(0, False, 0.0, 1, 0.1)}
    run(trainer)
    assert len(link.asked) == 2  # at start, and after the round alone
    # Up to the round alone, then the others' state of step 4 (the run's last): nothing
    # left to train.
    assert trained_steps(tmp_path / "alone") == trained
    assert trainer.position.global_step == 4
