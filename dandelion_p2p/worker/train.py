"""The trainer: one loop, readable top to bottom.

    python -m dandelion_p2p.worker --run-config run.toml --data images/ --work-dir out/

Per step: take this peer's next batch (bucketed, from the on-disk latent/text cache), draw
noise and timesteps per sample, predict, weight the loss (min-SNR), backpropagate, step the
optimizer at the LR the schedule gives for the swarm's global step. In local-steps mode every
H steps the pseudo-gradient goes to the swarm and the outer Nesterov step brings every peer
to the same weights; in gradient mode every step's gradient is averaged first. Checkpoints,
sample images, validation losses and progress reports (``reporting``) happen at their
intervals; a stop request (SIGTERM, or the daemon) ends the loop after the current step with a
checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import time
from typing import Any

import blake3
import numpy as np
import torch

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.runconfig.timeline import fixed_changes
from dandelion_p2p.worker import diffusion, fragments, joining, restoring
from dandelion_p2p.worker.batches import BatchMaker
from dandelion_p2p.worker.bucketing import make_buckets
from dandelion_p2p.worker.checkpoint import Checkpoint, CheckpointStore
from dandelion_p2p.worker.data import Sample
from dandelion_p2p.worker.device import pick_device, pick_precision
from dandelion_p2p.worker.draws import Draws
from dandelion_p2p.worker.ema import Ema
from dandelion_p2p.worker.feeds import (
    Batch,
    Feed,
    FolderFeed,
    LeasedFeed,
    Position,
    StopWaiting,
)
from dandelion_p2p.worker.link import DaemonLink, Link, SyncOutcome
from dandelion_p2p.worker.lockstep import carry_gradients, split_round
from dandelion_p2p.worker.model import (
    assign_from,
    flatten_into,
    load_components,
    select_trainable,
    use_attention,
)
from dandelion_p2p.worker.optimizers import (
    apply_live_settings,
    build_optimizer,
    set_learning_rates,
)
from dandelion_p2p.worker.options import WorkerOptions
from dandelion_p2p.worker.outer import OuterNesterov
from dandelion_p2p.worker.overlap import Overlap
from dandelion_p2p.worker.peer_group import SOLO, PeerGroup
from dandelion_p2p.worker.reporting import TrainingReports
from dandelion_p2p.worker.round_rules import (
    OuterRule,
    alone,
    log_not_applied,
    needs_catch_up,
    outer_rule,
)
from dandelion_p2p.worker.served_rounds import rounds_to_keep

log = logging.getLogger(__name__)


class StepDropped(Exception):
    """The swarm's averaging of this step's gradient did not take this peer's part: the
    step is not applied."""

    def __init__(self, outcome: SyncOutcome) -> None:
        super().__init__(f"round {outcome.round} was not averaged")
        self.outcome = outcome


def vector_digest(vector: torch.Tensor) -> str:
    return blake3.blake3(vector.detach().cpu().numpy().tobytes()).hexdigest()[:32]


class Trainer:
    peer_group: PeerGroup = SOLO  # the ranks of a peer on several devices (``distributed``)

    def __init__(self, config: RunConfig, options: WorkerOptions, link: Link,
                 peer: str = "") -> None:
        self.config = config
        self.options = options
        self.link = link
        self.stop_requested = False
        t = config.training
        options.work_dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(options.device)
        self.autocast_dtype = pick_precision(options.mixed_precision, self.device)

        # The model, and what of it trains.
        self.c = load_components(config.model)
        select_trainable(self.c, t, t.seed)
        if options.gradient_checkpointing:
            self.c.unet.enable_gradient_checkpointing()
        frozen_dtype = self.autocast_dtype or torch.float32
        self.c.unet.to(self.device)
        # After the move: xformers is probed with a test op on the UNet's own device.
        self.attention = use_attention(self.c, options.attention)
        self.c.vae.to(self.device)
        for encoder in self.c.text_encoders:
            encoder.to(self.device, torch.float32 if t.train_text_encoder else frozen_dtype)
        self.c.unet.train()
        self.params = [p for _, p in self.c.trainable]
        self.n_elements = sum(p.numel() for p in self.params)

        self.optimizer = build_optimizer(self.c.trainable, config, options.eight_bit_adam)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.autocast_dtype == torch.float16)
        log.info(
            "training %d parameters on %s, %s, %s attention, %s",
            self.n_elements,
            self.device,
            "fp32" if self.autocast_dtype is None else f"{self.autocast_dtype} autocast",
            self.attention,
            type(self.optimizer).__name__,
        )
        self.ema = (Ema(self.c.trainable, t.ema_decay, device=torch.device("cpu"))
                    if t.ema else None)

        # The data: a local folder, or chunks leased from the run's dataset servers.
        buckets = (make_buckets(t.resolution, t.bucket_min, t.bucket_max, t.bucket_step)
                   if t.bucketing else [(t.resolution, t.resolution)])
        self.feed = self._make_feed(buckets, peer)
        leased = isinstance(self.feed, LeasedFeed)
        self.draws = Draws(config, getattr(self.feed, "subset_folders", [""]))
        self.batches = BatchMaker(self.c, options.work_dir / "cache", self.device,
                                  cache_text=(not t.train_text_encoder and not leased
                                              and not self.draws.shapes_captions),
                                  cache_latents=not leased, clip_skip=config.data.clip_skip,
                                  chunks=config.data.max_token_length // 75)
        self.micro_batch = min(options.micro_batch or t.batch_size, t.batch_size)

        # The swarm: the shared buffer and, in local-steps mode, the outer optimizer.
        self.shared = torch.from_numpy(link.buffer(self.n_elements))
        self.flat = torch.empty(self.n_elements, dtype=torch.float32)
        flatten_into(self.params, self.flat)
        self.outer = (OuterNesterov(self.flat, config.sync.outer_lr, config.sync.outer_momentum)
                      if config.sync.mode == "local_steps" else None)
        self.overlap = Overlap(self) if self.outer is not None and config.sync.overlapped else None

        self.position = Position(expected_peers=config.averaging.min_group if link.run else 1)
        self.checkpoints = CheckpointStore(options.work_dir / "checkpoints",
                                           config.checkpoint.keep_last,
                                           rounds_to_keep(config))
        self.reports = TrainingReports(self)
        self.sync_log = (options.work_dir / "sync_log.jsonl").open("a")
        self.config_version = -1
        """The run config version in force here (-1: none applied yet)."""
        self.look_ahead = joining.LookAhead()
        self.replays = joining.ReplayTally()
        self.left_behind_at: int | None = None
        """While set, the others hold a state of this step that this peer lacks: it saves
        nothing (``joining.catch_up_and_join``)."""
        self.joined: bool | None = None
        """Whether ``resume`` took the swarm's state from peers (None: not resumed yet)."""
        self.carried = 0
        """Gradient mode: samples whose gradient sum a split round left in the parameters'
        gradients for the next round (``lockstep``)."""

    def resume(self) -> None:
        """Call once before ``run``: take the swarm's newer state if peers are ahead
        (``Link.catch_up``), load the newest checkpoint, apply the config version in force.

        Raises:
            ConfigError: the checkpoint is another run's or model's, or the version in
                force changes what a running worker cannot; and whatever the link raises.
        """
        have = self.checkpoints.latest_step()
        self.joined = joining.catch_up(self, have, wait=True) > have
        latest = self.checkpoints.latest()
        if latest is not None:
            self.restore(latest)
        self.apply_run_config()

    # ------------------------------------------------------------------ the loop

    def last_step(self) -> int:
        max_steps = self.config.training.max_steps
        return min(self.options.stop_at or max_steps, max_steps)

    def run(self) -> None:
        if self.joined is None:
            raise RuntimeError("Trainer.resume() must be called before Trainer.run()")
        self.report("training", force=True)
        if self.joined and self.outer is not None:
            joining.join_swarm(self)
            self.apply_run_config()
        started, samples = time.monotonic(), 0
        saved_at = -1
        while self.position.global_step < self.last_step() and not self.stop_requested:
            try:
                loss, n = self.train_step()
            except StopWaiting:
                # Asked to stop while waiting for a chunk: a part-gathered step is dropped.
                self.optimizer.zero_grad(set_to_none=True)
                saved_at = -1  # the feed may have moved on since that checkpoint
                break
            except StepDropped as dropped:
                saved_at = -1
                if dropped.outcome.stopping:
                    self.stop_requested = True
                    break
                joining.catch_up_and_join(self)
                self.apply_run_config()
                continue
            samples += n
            p = self.position
            self.log_step(loss, samples / max(1e-9, time.monotonic() - started))
            boundary = (self.outer is None
                        or p.global_step % fragments.interval(self.config) == 0)
            if self.outer is not None and boundary:
                outcome = (self.overlap.boundary() if self.overlap is not None
                           else self.sync_local_steps())
                while outcome is not None and needs_catch_up(outcome):
                    # Others were there but we could not average with them: we are behind
                    # (or went alone for a while). Take the swarm's state and join it.
                    loaded = joining.catch_up_and_join(self, outcome)
                    outcome = (self.overlap.start_skipped_round()
                               if self.overlap is not None and not loaded else None)
                if outcome is not None and alone(outcome):
                    self.look_ahead.after_alone_round(self)
            elif self.overlap is not None:
                self.overlap.poll()
            if boundary:
                self.apply_run_config()
            if p.global_step % self.config.checkpoint.every_steps == 0:
                self.save()
                saved_at = p.global_step
            self.reports.after_step()  # sample images, validation loss
        # A save replaces a checkpoint of the same step: skip rewriting the one just written.
        if saved_at != self.position.global_step:
            self.save()
        if self.position.global_step >= self.config.training.max_steps and self.options.export:
            from dandelion_p2p.worker.export import export

            export(self.c, self.config, self.options.work_dir / "export",
                   self.position.global_step, self.ema)
        self.report("stopped", force=True)

    def train_step(self) -> tuple[float, int]:
        """One optimizer step (gradient mode: after the swarm averaged the gradients);
        returns (mean loss, samples this peer trained)."""
        p = self.position
        target = self.local_target()
        total, loss_sum, carried = 0, 0.0, self.carried
        while True:
            batch = self.feed.next_batch(p)
            # The batch is the run's; this machine may cut it into smaller forward passes
            # (local settings: micro_batch) without changing what is learned.
            for part in batch.split(self.micro_batch):
                loss_sum += self.forward_backward(part)
            self.feed.batch_trained(p)
            total += len(batch.samples)
            if self.outer is not None or carried + total >= target:
                break
        total, loss_sum = self.peer_group.reduce_gradients(self.params, total, loss_sum)
        self.carried = 0
        scale = 1.0 / (carried + total)
        for param in self.params:
            if param.grad is not None:
                param.grad.mul_(scale)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.outer is None:
            outcome = self.sync_gradients(carried + total)
            if outcome.stopping or outcome.behind:
                # The swarm's step goes on without this gradient (or the daemon is stopping
                # mid-round): applied alone it would set this peer's weights apart from the
                # swarm's for good, since gradient mode never averages weights.
                self.optimizer.zero_grad(set_to_none=True)
                raise StepDropped(outcome)
            split = split_round(outcome, p.expected_peers)
            p.expected_peers = max(1, outcome.members)
            if split:
                # Nobody applies a split round's parts: the step moves on with the weights
                # unchanged, and this peer's gradient waits for the next round.
                # (On several devices every rank holds the peer's summed gradient; the
                # ranks but rank 0 drop theirs, ``distributed``, so it is counted once.)
                carry_gradients(self.params, carried + total, self.scaler)
                self.carried = carried + total
                p.global_step += 1
                p.samples_since_sync += total
                return loss_sum / total, total
            assign_from(self.params, self.shared, grads=True)
        if self.config.optimizer.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.optimizer.max_grad_norm)
        set_learning_rates(self.optimizer, p.global_step, self.config)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        p.global_step += 1
        p.samples_since_sync += total
        return loss_sum / total, total

    def forward_backward(self, batch: Batch) -> float:
        """Accumulate the gradient of the summed per-sample loss; returns that sum."""
        t = self.config.training
        step = self.position.global_step
        hashes = [sample.content_hash for sample in batch.samples]
        captions = [self.caption(sample, step) for sample in batch.samples]
        latents, size_cond = self.batches.latents(
            batch.samples, batch.bucket,
            [self.draws.augmentation(sample, step) for sample in batch.samples])
        scheduler = self.c.noise_scheduler
        noise, timesteps = diffusion.draw_noise(
            latents, t.seed, step, hashes, scheduler.config.num_train_timesteps, t.noise_offset
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = diffusion.target_for(scheduler, latents, noise, timesteps,
                                      self.c.prediction)
        weights = diffusion.loss_weights(scheduler.alphas_cumprod, timesteps,
                                         t.min_snr_gamma, self.c.prediction)
        weights = weights * self.draws.loss_weights(batch.samples, weights.device)
        with self.autocast():
            text = self.batches.text(captions)
            prediction = self.c.unet(noisy, timesteps,
                                     **self.batches.unet_kwargs(text, size_cond)).sample
        per_sample = (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * weights).sum()
        self.scaler.scale(loss).backward()
        return float(loss.detach())

    def caption(self, sample: Sample, step: int) -> str:
        """The caption as this draw trains it (dropout, shuffled and dropped tags)."""
        return self.draws.caption(sample, step)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _make_feed(self, buckets: list[tuple[int, int]], peer: str) -> Feed:
        t, options = self.config.training, self.options
        if options.data is not None:
            shard, order = options.shard, [t.seed]
            if shard is None:
                # Without a shard from the swarm each peer walks the data in its own order.
                shard = (0, 1)
                order = [t.seed, int(blake3.blake3(peer.encode()).hexdigest()[:8], 16)]
            return FolderFeed(options.data, buckets, t.batch_size, order, shard,
                              scan_cache=options.work_dir / "cache" / "scan.sqlite",
                              follow_symlinks=options.follow_symlinks, config=self.config)
        if options.shard is not None:
            raise ConfigError("a shard of the data needs a local folder (--data)")
        if not isinstance(self.link, DaemonLink):
            raise ConfigError("without a daemon there are no leased chunks: give --data")
        return LeasedFeed(self.link, options.work_dir, buckets, t.batch_size, t.seed,
                          lambda: self.stop_requested)

    def local_target(self) -> int:
        """Gradient mode: samples this peer gathers per step, its share of the target batch."""
        if self.outer is not None:
            return self.config.training.batch_size
        share = math.ceil(self.config.sync.target_batch / max(1, self.position.expected_peers))
        return max(1, share)

    # ------------------------------------------------------------------ the swarm

    def sync_local_steps(self) -> SyncOutcome:
        """Average the pseudo-gradient (start - now) with the swarm and take the outer step,
        when ``round_rules`` says this round is applied."""
        assert self.outer is not None
        p = self.position
        round_ = p.global_step // self.config.sync.local_steps
        flatten_into(self.params, self.flat)
        self.outer.pseudo_gradient(self.flat, self.shared)
        if not bool(torch.isfinite(self.shared).all()):
            raise FloatingPointError("the local steps produced non-finite weights")
        self.report("syncing", force=True)
        outcome = self.link.sync(round_, p.samples_since_sync, "local_steps")
        rule = outer_rule(outcome, self.config.sync.outer_step_alone)
        if rule is OuterRule.ALONE:
            # The outer step extrapolates the swarm's averaged progress; applied to this
            # peer's own progress alone it would only distort what the inner optimizer did.
            new_start = self.outer.restart_from(self.flat)
            self.checkpoints.rounds.applied_alone()
        else:
            if rule is OuterRule.STEP:
                self.checkpoints.rounds.add(round_, outcome.members, self.shared.numpy(),
                                            self.config.averaging.codec)
                new_start = self.outer.step(self.shared)
            else:
                log_not_applied(outcome)
                new_start = self.outer.start
            assign_from(self.params, new_start)
        self.after_sync(outcome, new_start)
        return outcome

    def sync_gradients(self, samples: int) -> SyncOutcome:
        """Average this peer's gradient with the swarm's for this step, in the shared buffer
        (``train_step`` takes the average, or keeps its own gradient when the round split)."""
        p = self.position
        flatten_into(self.params, self.shared, grads=True)
        self.report("syncing")
        outcome = self.link.sync(p.global_step + 1, samples, "gradient")
        self.after_sync(outcome, None)
        return outcome

    def after_sync(self, outcome: SyncOutcome, weights: torch.Tensor | None,
                   waited: float | None = None, extra: dict[str, Any] | None = None) -> None:
        """``waited``: seconds the worker did not train for this round (None: all of it);
        ``extra``: more fields for the sync log's line."""
        waited = outcome.seconds if waited is None else waited
        p = self.position
        p.rounds += 1
        p.samples_since_sync = 0
        entry: dict[str, Any] = {"round": outcome.round, "global_step": p.global_step,
                 "config_version": self.config_version,
                 "averaged": outcome.averaged, "members": outcome.members,
                 "fraction_averaged": outcome.fraction_averaged,
                 "seconds": round(outcome.seconds, 3), "waited": round(waited, 3),
                 **({"left_behind": True} if outcome.left_behind else {}), **(extra or {})}
        if weights is not None:
            entry["digest"] = vector_digest(weights)
        self.sync_log.write(json.dumps(entry) + "\n")
        self.sync_log.flush()
        log.info("round %d: %s, %d members, %.0f%% averaged, %.2f s", outcome.round,
                 "averaged" if outcome.averaged else "alone", outcome.members,
                 100 * outcome.fraction_averaged, outcome.seconds)
        self.reports.round(outcome, waited)

    # ------------------------------------------------------------------ reporting

    def log_step(self, loss: float, samples_per_second: float) -> None:
        self.last_loss, self.last_rate = loss, samples_per_second
        self.reports.step(loss, samples_per_second)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.position.global_step}")
        self.report("training")

    def report(self, state: str, force: bool = False) -> None:
        p = self.position
        stop = self.link.progress({
            "state": state,
            "step": p.batches_done,
            "global_step": p.global_step,
            "loss": getattr(self, "last_loss", None),
            "samples_per_second": getattr(self, "last_rate", None),
            "detail": f"{self.feed.describe()}, {self.n_elements} trained parameters",
            **self.reports.fields(),
        }, force=force)
        if stop:
            log.info("the daemon asks this worker to stop")
            self.stop_requested = True

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        if self.left_behind_at is not None:
            log.info("not saving step %d: the others hold the state of step %d, which this "
                     "peer lacks", self.position.global_step, self.left_behind_at)
            return
        if self.overlap is not None:
            self.overlap.drain()  # a checkpoint holds no round in flight (``overlap``)
        p = self.position
        tensors: dict[str, dict[str, torch.Tensor]] = {
            "trainable": {name: p.detach() for name, p in self.c.trainable}
        }
        if self.ema is not None:
            tensors["ema"] = self.ema.state_dict()
        if self.outer is not None:
            tensors["outer"] = self.outer.state_dict()
        if self.overlap is not None:
            tensors.update(self.overlap.checkpoint_tensors())
        blobs = {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        }
        meta = {
            "run": self.config.name,
            "position": dict(vars(p)),
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "names": [name for name, _ in self.c.trainable],
        }
        path = self.checkpoints.save(p.global_step, meta, tensors, blobs)
        log.info("checkpoint %s", path)

    def restore(self, checkpoint: Checkpoint) -> None:
        restoring.restore(self, checkpoint)
        self.replays = joining.ReplayTally(self.position.global_step)
        log.info("resumed from checkpoint %s at global step %d", checkpoint.path,
                 self.position.global_step)
        # The optimizer state brought back the hyperparameters it was saved with.
        self.apply_run_config(reapply=True)

    # ------------------------------------------------------------------ run config versions

    def apply_run_config(self, *, reapply: bool = False) -> None:
        """Switch to the run config version in force at this global step. Called only at a
        round boundary (or on a restored checkpoint's step), so every peer switches at the
        same step and the peers of a round all train it under one version; the version goes
        with the next sync, and the daemon averages only with peers on the same one.
        ``reapply``: set the live settings again even if the version did not change."""
        step = self.position.global_step
        target = self.link.run_configs.in_force(step)
        if target is None:
            return
        if target.version != self.config_version:
            changed = fixed_changes(self.config, target.config)
            if changed:
                # The daemon refuses such versions; a worker must never half-apply one.
                raise ConfigError(
                    f"run config version {target.version} changes {', '.join(changed)}, "
                    "which a running worker cannot change")
            if self.config_version < 0:
                log.info("training under run config version %d (in force from global step %d)"
                         " at global step %d", target.version, target.effective_step, step)
            else:
                log.info("applying run config version %d at global step %d", target.version,
                         step)
            self.config, self.config_version = target.config, target.version
            reapply = True
        if reapply:
            self._use_live_settings()
        self.link.round_config(self.config_version, step)

    def _use_live_settings(self) -> None:
        """Put the settings a version may change into what was built from the config (the
        rest is read from ``self.config`` where it is used)."""
        c = self.config
        apply_live_settings(self.optimizer, c)
        self.draws.update(c)
        if self.outer is not None:
            self.outer.lr, self.outer.momentum = c.sync.outer_lr, c.sync.outer_momentum
        if self.ema is not None:
            self.ema.decay = c.training.ema_decay
        self.checkpoints.keep_last = c.checkpoint.keep_last
        self.checkpoints.rounds.keep = rounds_to_keep(c)

    def close(self) -> None:
        self.checkpoints.rounds.wait()
        self.reports.close()
        self.sync_log.close()
        self.link.close()


def run_until_stopped(trainer: Trainer) -> None:
    """Run ``trainer`` with SIGTERM and SIGINT asking it to stop after the current step (with
    a checkpoint), then close it."""

    def request_stop(signum: int, frame: object) -> None:
        log.info("stopping after this step (signal %d)", signum)
        trainer.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        trainer.run()
    finally:
        trainer.close()
