"""What the trainer tells people about its training, in one place: ``train_log.jsonl``, the
console bar (``progress``), TensorBoard (``tensorboard_log``), sample images and the
validation loss on the held-out split (``validation``) at their intervals, and the fields of
the progress reports the daemon charts in the web UI.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from dandelion_p2p.worker import validation
from dandelion_p2p.worker.feeds import FolderFeed
from dandelion_p2p.worker.link import SyncOutcome
from dandelion_p2p.worker.progress import ConsoleProgress, round_text
from dandelion_p2p.worker.protocol import SAMPLES_DIR
from dandelion_p2p.worker.tensorboard_log import TensorBoardLog

if TYPE_CHECKING:
    from dandelion_p2p.worker.train import Trainer

log = logging.getLogger(__name__)


class TrainingReports:
    """Made by the trainer once its feed and batch maker exist: takes the held-out split out
    of the training images before the first batch is planned."""

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer
        work = trainer.options.work_dir
        self.train_log = (work / "train_log.jsonl").open("a")
        self.board = TensorBoardLog(work / "tensorboard")
        self.console = ConsoleProgress(trainer.last_step())
        self.val_batches = self._hold_out()
        self.learning_rate: float | None = None
        self.validation_loss: float | None = None
        self.validation_step: int | None = None
        self.sync_wait_seconds = 0.0
        """Seconds this worker waited for the swarm's rounds since it started (blocking: every
        round's whole time; ``sync.overlap``: the waits at the boundaries)."""
        self.round_interval: float | None = None
        """Seconds between the last two rounds (None: fewer than two yet): the swarm's pace
        as this peer saw it."""
        self._last_round_at: float | None = None

    def _hold_out(self) -> list[validation.ValBatch]:
        v = self.t.config.validation
        if v.split <= 0:
            return []
        feed = self.t.feed
        if not isinstance(feed, FolderFeed):
            log.info("validation: leased chunks hold no fixed held-out split; no validation "
                     "loss on this peer (it needs a local data folder, --data)")
            return []
        before = len(feed.samples)
        feed.entries, held = validation.split(feed.samples, feed.entries, v.split,
                                              v.max_images)
        if not held:
            log.warning("validation: validation.split = %g holds out none of %d images",
                        v.split, before)
            return []
        log.info("validation: %d of %d images held out (validation.split = %g); loss every "
                 "%s", len(held), before, v.split,
                 f"{v.every_steps} steps" if v.every_steps else "- (every_steps = 0: never)")
        return validation.batches_of(held, feed.buckets)

    # ------------------------------------------------------------------ per step

    def step(self, loss: float, samples_per_second: float) -> None:
        step = self.t.position.global_step
        groups = self.t.optimizer.param_groups
        self.learning_rate = float(groups[0]["lr"]) if groups else None
        self.train_log.write(json.dumps({"step": step, "loss": loss, "lr": self.learning_rate,
                                         "time": time.time()}) + "\n")
        self.train_log.flush()
        if math.isfinite(loss):
            self.board.scalars(step, {"loss": loss, "learning_rate": self.learning_rate,
                                      "samples_per_second": samples_per_second})
        self.console.step(step, loss, self.learning_rate)

    def round(self, outcome: SyncOutcome, waited: float) -> None:
        """``waited``: seconds the worker did not train for this round."""
        self.sync_wait_seconds += waited
        now = time.monotonic()
        if self._last_round_at is not None:
            self.round_interval = now - self._last_round_at
        self._last_round_at = now
        self.board.scalars(self.t.position.global_step, {
            "round_seconds": outcome.seconds, "fraction_averaged": outcome.fraction_averaged,
            "round_peers": float(outcome.members), "sync_wait_seconds": waited})
        self.console.note("round", round_text(outcome))

    def after_step(self) -> None:
        """Sample images and the validation loss, each at its interval."""
        step = self.t.position.global_step
        t, v = self.t.config.training, self.t.config.validation
        if t.sample_every and step % t.sample_every == 0:
            self.sample_images()
        if self.val_batches and v.every_steps and step % v.every_steps == 0:
            self.validate()

    @torch.no_grad()
    def sample_images(self) -> None:
        from dandelion_p2p.worker.sampling import sample_images

        t, step = self.t, self.t.position.global_step
        paths = sample_images(t.c, t.config, t.options.work_dir / SAMPLES_DIR, step, t.device,
                              t.ema)
        self.board.images(step, paths)
        log.info("step %d: wrote %d sample images from the %s weights", step, len(paths),
                 t.config.exported_weights())

    def validate(self) -> float:
        t, step = self.t, self.t.position.global_step
        started = time.monotonic()
        loss = validation.validation_loss(t.c, t.batches, self.val_batches, t.autocast)
        self.validation_loss, self.validation_step = loss, step
        self.board.scalars(step, {"validation_loss": loss})
        self.board.flush()
        self.console.note("val", f"{loss:.4f}")
        log.info("step %d: validation loss %.5f on %d held-out images (%.1f s)", step, loss,
                 sum(len(s) for s, _ in self.val_batches), time.monotonic() - started)
        t.report("training", force=True)
        return loss

    def fields(self) -> dict[str, Any]:
        """Fields of the worker's progress report (``protocol/worker.md``)."""
        out: dict[str, Any] = {"lr": self.learning_rate,
                               "sync_wait_seconds": round(self.sync_wait_seconds, 3)}
        if self.validation_step is not None:
            out["validation_loss"] = self.validation_loss
            out["validation_step"] = self.validation_step
        return out

    def close(self) -> None:
        self.console.close()
        self.board.close()
        self.train_log.close()
