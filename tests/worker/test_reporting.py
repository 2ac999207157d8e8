"""What a worker reports of its training: the console bar, TensorBoard event files, the
held-out split and its validation loss, and the fields the daemon charts."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dandelion_p2p.sync.rpc import WorkerProgress
from dandelion_p2p.telemetry import Telemetry
from dandelion_p2p.worker import validation
from dandelion_p2p.worker.data import Sample
from dandelion_p2p.worker.link import SoloLink, SyncOutcome
from dandelion_p2p.worker.progress import ConsoleProgress, round_text
from dandelion_p2p.worker.quiet import (
    BITSANDBYTES_4BIT_KERNEL,
    TORCHVISION_FALLBACK,
    quiet_third_party,
)
from dandelion_p2p.worker.tensorboard_log import TAGS, TensorBoardLog
from dandelion_p2p.worker.train import Trainer, WorkerOptions
from tests.worker.runconfigs import tiny_run


def events(folder: Path) -> object:
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc: object, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- console


def test_round_text_says_what_the_round_did() -> None:
    assert round_text(SyncOutcome(3, True, 1.0, 4, 2.25)) == (
        "round 3: 4 peers, 100% averaged, 2.2 s")
    assert round_text(SyncOutcome(4, False, 0.0, 1, 0.0)) == "round 4: alone"
    assert round_text(SyncOutcome(5, False, 0.0, 3, 9.0)) == "round 5: not averaged (3 peers)"
    assert round_text(SyncOutcome(6, False, 0.0, 1, 0.0, behind=True)) == (
        "round 6: behind, catching up")
    assert round_text(SyncOutcome(7, False, 0.0, 1, 0.0, stopping=True)) == (
        "round 7: cut short")


def test_the_bar_shows_loss_rate_eta_and_the_last_round() -> None:
    out = io.StringIO()
    bar = ConsoleProgress(total=10, file=out, enabled=True)
    bar.step(4, 0.5, 1e-4)  # resumed at step 3: the bar starts there
    bar.step(5, 0.25, 1e-4)
    bar.note("round", round_text(SyncOutcome(2, True, 0.5, 3, 1.0)))
    bar.note("val", "0.1234")
    bar.step(6, 0.125, 5e-5)
    bar.close()
    last = out.getvalue().split("\r")[-1]
    assert "6/10" in last and ("it/s" in last or "s/it" in last), last
    assert "<" in last, f"an ETA is shown: {last}"
    assert "loss 0.1250" in last and "lr 5.00e-05" in last and "val 0.1234" in last, last
    assert "round 2: 3 peers, 50% averaged, 1.0 s" in last, last


def test_no_bar_off_a_terminal_and_logging_left_alone() -> None:
    out = io.StringIO()  # not a terminal
    bar = ConsoleProgress(total=10, file=out)
    handlers = list(logging.getLogger().handlers)
    bar.step(1, 0.5, 1e-4)
    bar.note("round", "round 1: alone")
    assert logging.getLogger().handlers == handlers
    bar.close()
    assert out.getvalue() == ""


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_torchvision_fallback_notice_alone_is_dropped() -> None:
    quiet_third_party()
    quiet_third_party()  # idempotent
    logger = logging.getLogger("transformers.utils.import_utils")
    assert len(logger.filters) == 1
    kept = Kept()
    logger.addHandler(kept)  # transformers' loggers do not propagate to the root
    # Other tests may have turned transformers' verbosity down: this one needs warnings on.
    level, disabled = logger.level, logger.disabled
    logger.setLevel(logging.WARNING)
    logger.disabled = False
    try:
        logger.warning("`CLIPImageProcessor` %s; falling back", TORCHVISION_FALLBACK)
        logger.warning("something else that matters")
    finally:
        logger.removeHandler(kept)
        logger.setLevel(level)
        logger.disabled = disabled
    assert kept.messages == ["something else that matters"]


def test_bitsandbytes_on_a_cpu_without_kernels_starts_silently() -> None:
    """The worker's 8-bit AdamW imports bitsandbytes, whose import warns that a 4-bit CPU
    kernel is missing; imported after ``quiet_third_party`` it says nothing, and without it
    the warning is still there (so this checks the filter, not a machine without it)."""
    pytest.importorskip("bitsandbytes")
    program = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "{quiet}import bitsandbytes\n"
    )
    quiet = "from dandelion_p2p.worker.quiet import quiet_third_party; quiet_third_party()\n"
    outputs = []
    for prefix in ("", quiet):
        done = subprocess.run(
            [sys.executable, "-c", program.format(quiet=prefix)],
            capture_output=True, text=True, timeout=120, check=True,
        )
        outputs.append(done.stderr)
    noisy, quieted = outputs
    if BITSANDBYTES_4BIT_KERNEL not in noisy:
        pytest.skip("this bitsandbytes build loads its 4-bit CPU kernel: nothing to quiet")
    assert BITSANDBYTES_4BIT_KERNEL not in quieted, quieted


# ---------------------------------------------------------------------------- tensorboard


def test_tensorboard_events_hold_scalars_and_images(tmp_path: Path) -> None:
    board = TensorBoardLog(tmp_path / "tb")
    if not board.enabled:
        pytest.skip("the tensorboard package is not installed")
    board.scalars(1, {"loss": 0.5, "learning_rate": 1e-4, "samples_per_second": 8.0})
    board.scalars(2, {"loss": 0.25, "learning_rate": None, "validation_loss": 0.75})
    board.scalars(2, {"round_seconds": 1.5, "fraction_averaged": 1.0, "round_peers": 3.0})
    image = tmp_path / "step.png"
    Image.new("RGB", (16, 8), (200, 10, 10)).save(image)
    board.images(2, [image])
    board.close()
    acc = events(tmp_path / "tb")
    assert scalars(acc, TAGS["loss"]) == [(1, 0.5), (2, 0.25)]
    assert scalars(acc, TAGS["learning_rate"]) == [(1, pytest.approx(1e-4))]
    assert scalars(acc, TAGS["validation_loss"]) == [(2, 0.75)]
    assert scalars(acc, TAGS["round_peers"]) == [(2, 3.0)]
    shown = acc.Images("samples/00")  # type: ignore[attr-defined]
    assert [(e.step, e.width, e.height) for e in shown] == [(2, 16, 8)]


# ---------------------------------------------------------------------------- daemon side


def test_the_daemon_charts_lr_and_each_validation_once() -> None:
    telemetry, progress = Telemetry(), WorkerProgress()
    progress.update({"global_step": 2, "loss": 0.5, "lr": 1e-4}, telemetry)
    progress.update({"global_step": 2, "loss": 0.4, "lr": 1e-4, "validation_loss": 0.9,
                     "validation_step": 2}, telemetry)
    progress.update({"global_step": 3, "loss": 0.3, "lr": 5e-5, "validation_loss": 0.9,
                     "validation_step": 2}, telemetry)  # the same validation, reported again
    progress.update({"global_step": 4, "lr": float("nan"), "validation_loss": "x",
                     "validation_step": 4}, telemetry)  # malformed: ignored
    assert [p.value for p in telemetry.series("learning_rate")] == [1e-4, 1e-4, 5e-5]
    assert [p.value for p in telemetry.series("validation_loss")] == [0.9]
    assert (progress.validation_step, progress.validation_loss) == (2, 0.9)
    assert progress.learning_rate == 5e-5


# ---------------------------------------------------------------------------- validation


def _sample(i: int) -> Sample:
    return Sample(key=f"s{i}", path=Path("/nonexistent"), offset=0, size=0,
                  content_hash=f"{i:064x}", caption="", width=64, height=64)


def test_the_split_is_chosen_by_content_hash() -> None:
    samples = [_sample(i) for i in range(400)]
    entries = [*range(400), *range(0, 400, 2)]  # even images drawn twice (repeats)
    keep, held = validation.split(samples, entries, 0.25, max_images=1000)
    held_hashes = {s.content_hash for s in held}
    assert 60 < len(held) < 140, len(held)
    assert not held_hashes & {samples[i].content_hash for i in keep}, "held out means unseen"
    assert len(keep) + sum(2 if int(s.key[1:]) % 2 == 0 else 1 for s in held) == len(entries)
    again = validation.split(list(reversed(samples)), entries[::-1], 0.25, max_images=1000)[1]
    assert {s.content_hash for s in again} == held_hashes, "the same on every peer"
    assert validation.split(samples, entries, 0.25, max_images=5)[1] == held[:5]
    assert validation.split(samples, entries, 0.0, max_images=5) == (entries, [])


def test_training_writes_every_series_and_validates_at_its_interval(
        tiny_sd1: Path, images: Path, tmp_path: Path) -> None:
    config = tiny_run(tiny_sd1, training={"max_steps": 4, "sample_every": 4, "sample_steps": 2,
                                          "sample_prompts": ["a red square"]},
                      sync={"local_steps": 2}, checkpoint={"every_steps": 2},
                      validation={"every_steps": 2, "split": 0.3})
    toml = tmp_path / "run.toml"
    toml.write_text(config.to_toml())
    work = tmp_path / "work"
    trainer = Trainer(config, WorkerOptions(data=images, work_dir=work, export=False,
                                            device="cpu"), SoloLink(toml))
    held = [s for batch, _ in trainer.reports.val_batches for s in batch]
    assert held, "the tiny set has images held out at 0.3"
    feed = trainer.feed
    trained = {feed.samples[i].content_hash for i in feed.entries}  # type: ignore[attr-defined]
    assert not trained & {s.content_hash for s in held}
    trainer.resume()
    try:
        trainer.run()
        # Fixed noise and timesteps: the same weights give the same loss every time, whatever
        # the global generator; other weights another.
        torch.manual_seed(99)
        again = trainer.reports.validate()
        assert again == trainer.reports.validation_loss
        assert trainer.reports.fields()["validation_step"] == 4
        with torch.no_grad():
            for _, p in trainer.c.trainable:
                p.mul_(0.5)
        assert validation.validation_loss(trainer.c, trainer.batches,
                                          trainer.reports.val_batches) != again
    finally:
        trainer.close()

    logged = [json.loads(x) for x in (work / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged] == [1, 2, 3, 4]
    assert all(e["lr"] == pytest.approx(1e-3) for e in logged)
    acc = events(work / "tensorboard")
    assert [s for s, _ in scalars(acc, TAGS["loss"])] == [1, 2, 3, 4]
    assert [v for _, v in scalars(acc, TAGS["loss"])] == pytest.approx(
        [e["loss"] for e in logged])
    assert [s for s, _ in scalars(acc, TAGS["learning_rate"])] == [1, 2, 3, 4]
    assert [s for s, _ in scalars(acc, TAGS["samples_per_second"])] == [1, 2, 3, 4]
    val = scalars(acc, TAGS["validation_loss"])
    assert [s for s, _ in val] == [2, 4, 4]
    assert val[-1][1] == pytest.approx(val[-2][1])
    assert [s for s, _ in scalars(acc, TAGS["round_seconds"])] == [2, 4]
    assert [v for _, v in scalars(acc, TAGS["round_peers"])] == [1.0, 1.0]
    assert [v for _, v in scalars(acc, TAGS["fraction_averaged"])] == [0.0, 0.0]
    shown = acc.Images("samples/00")  # type: ignore[attr-defined]
    assert [(e.step, e.width, e.height) for e in shown] == [(4, 64, 64)]
    assert (work / "samples" / "step-00000004-raw-00.png").exists()
