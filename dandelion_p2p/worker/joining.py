"""Joining the swarm mid-run, whatever the size of its state.

A joiner downloads the swarm's newest checkpoint through its daemon (``Link.catch_up``). On a
home link that can take several sync intervals, and the swarm does not wait: once the files
are in, the step downloaded is rounds behind, and the round after it is long over. So while
the download runs, the worker takes part in every round that follows the step being
downloaded, with nothing to add (weight 0, a zero vector), and keeps each round's averaged
pseudo-gradient on disk (``WORK/joining/``). Once the state is in, it loads it and applies
the kept rounds' outer steps in order, as every peer applied them: it then holds the swarm's
weights and momentum bit for bit, and trains the next round with the others.

A round the swarm finished without this peer (common when rounds are shorter than the
worker's start) breaks the chain: the state being downloaded cannot be brought past it. The
worker takes part on from the next round, loads the state, applies what follows on from it,
and fetches a newer state (the swarm writes one at its checkpoint steps) that the rounds kept
after the gap do follow on from, taking part on meanwhile. A peer on several devices
(``--devices``) does not take part in rounds while it downloads.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dandelion_p2p.worker import fragments
from dandelion_p2p.worker.link import DaemonLink, SyncOutcome
from dandelion_p2p.worker.model import assign_from
from dandelion_p2p.worker.round_rules import averaged_in_full

if TYPE_CHECKING:
    from dandelion_p2p.worker.train import Trainer

log = logging.getLogger(__name__)

STATUS_POLL = 0.5
"""Seconds between two looks at the download (which step, once the offers are chosen)."""
WAIT_POLL = 1.0
"""Seconds between two asks for the state of a round this peer was left behind in."""
WAIT_MARGIN = 3.0
MIN_WAIT = 30.0
"""Least seconds a peer left behind waits for the others' state (``state_wait``)."""
JOIN_ATTEMPTS = 5
LOOK_AHEAD_EVERY = 60.0
"""Seconds between two asks for a newer state while this peer averages alone."""
ROUNDS_AFTER_DOWNLOAD = 3
"""Rounds a joiner still takes part in once its state is in, to keep one after a round it
missed (``catch_up_taking_part``)."""
_KEPT = re.compile(r"round-(\d{8})-(\d+)\.npy")


class KeptRounds:
    """The averaged pseudo-gradients of the rounds a joiner took part in, one file each
    (``round-RRRRRRRR-M.npy``, M the round's members), written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def keep(self, round_: int, members: int, vector: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".round-{round_:08d}.npy"
        np.save(tmp, vector)
        os.replace(tmp, self.folder / f"round-{round_:08d}-{members}.npy")

    def rounds(self) -> dict[int, tuple[Path, int]]:
        """Round -> (its file, its members), in round order."""
        if not self.folder.is_dir():
            return {}
        found = {}
        for path in self.folder.iterdir():
            if m := _KEPT.fullmatch(path.name):
                found[int(m.group(1))] = (path, int(m.group(2)))
        return dict(sorted(found.items()))


def kept_rounds(trainer: Trainer) -> KeptRounds:
    return KeptRounds(trainer.options.work_dir / "joining")


def take_part(trainer: Trainer, round_: int) -> SyncOutcome:
    """Round ``round_`` with nothing to add: a zero vector of weight 0, trained (for the
    daemon's version check) under the config version in force at the round's first step."""
    link = trainer.link
    first_step = (round_ - 1) * fragments.interval(trainer.config)
    in_force = link.run_configs.in_force(first_step)
    link.round_config(in_force.version if in_force is not None else 0, first_step)
    trainer.shared.zero_()
    trainer.report("syncing", force=True)
    span = fragments.round_span(trainer.config, round_, trainer.n_elements)
    return link.sync(round_, 0.0, "local_steps",
                     span=fragments.named_span(trainer.config, span))


def catch_up_taking_part(trainer: Trainer, have: int, *, wait: bool = False,
                         fresh: bool = True) -> int:
    """``Link.catch_up(have)``, taking part in the swarm's rounds after the step being
    downloaded meanwhile (kept in ``kept_rounds``); returns the step downloaded, or -1.

    ``fresh``: a new catch-up, whose kept rounds start empty. Otherwise (a newer state
    fetched because the rounds kept during the last download do not follow on from it) the
    rounds kept so far stay, and taking part goes on after the last of them, so that the
    chain reaches the newer state."""
    link = trainer.link
    folder = trainer.checkpoints.root
    if trainer.outer is None or not isinstance(link, DaemonLink):
        return link.catch_up(have, folder, wait=wait)
    kept = kept_rounds(trainer)
    if fresh:
        kept.clear()
    got: list[int] = []
    failed: list[BaseException] = []

    def download() -> None:
        try:
            got.append(link.catch_up(have, folder, wait=wait))
        except BaseException as exc:  # raised again on the trainer's thread
            failed.append(exc)

    thread = threading.Thread(target=download, name="catch-up", daemon=True)
    thread.start()
    h = fragments.interval(trainer.config)
    already = kept.rounds()
    next_round = max(already) + 1 if already else None
    missed = False  # since the last round kept: the chain must start again after it
    extra = 0
    while not trainer.stop_requested:
        if not thread.is_alive():
            # The state is in. After a missed round, one more kept round is worth a few
            # rounds' wait: the newer state fetched next is then bridged to the swarm's.
            if not missed or next_round is None or extra == ROUNDS_AFTER_DOWNLOAD:
                break
            extra += 1
        if next_round is None:
            step = link.catch_up_status()
            if step > have:
                next_round = step // h + 1
                log.info("downloading the state of step %d; taking part in the rounds from "
                         "%d on meanwhile", step, next_round)
        if next_round is None or next_round * h > trainer.last_step():
            # (No round past the run's last step: the swarm ends there.)
            if not thread.is_alive():
                break
            thread.join(STATUS_POLL)
            continue
        outcome = take_part(trainer, next_round)
        if outcome.stopping:
            break
        if averaged_in_full(outcome):
            a, b = fragments.round_span(trainer.config, next_round, trainer.n_elements)
            kept.keep(next_round, outcome.members, trainer.shared[a:b].numpy())
            next_round += 1
            missed = False
        elif outcome.members > 1 or outcome.behind:
            # The chain has a gap here: the state being downloaded cannot be brought past
            # it, but a newer one can be brought along the rounds kept after it.
            log.info("the swarm finished round %d without this peer: taking part in the "
                     "next one", next_round)
            next_round += 1
            missed = True
    thread.join()
    if failed:
        raise failed[0]
    return got[0] if got else -1


def apply_round(trainer: Trainer, outcome: SyncOutcome) -> None:
    """The outer step of the round whose average the shared buffer holds, as every member
    of it takes it: the weights move to the new start and the global step to the round's
    end."""
    assert trainer.outer is not None
    span = fragments.round_span(trainer.config, outcome.round, trainer.n_elements)
    new_start = trainer.outer.step(trainer.shared, span)
    assign_from(trainer.params, new_start)
    trainer.position.global_step += fragments.interval(trainer.config)
    trainer.after_sync(outcome, new_start)


def apply_kept(trainer: Trainer) -> tuple[int, bool]:
    """Apply the outer steps of the kept rounds that follow the loaded state, in order, as
    the swarm applied them. Returns how many, and whether kept rounds remain beyond a round
    missing from the chain (they stay on disk for a newer state to bridge); the rounds
    applied and those the state already holds are deleted."""
    assert trainer.outer is not None
    h = fragments.interval(trainer.config)
    p = trainer.position
    kept = kept_rounds(trainer)
    applied = 0
    for round_, (path, members) in kept.rounds().items():
        if round_ <= p.global_step // h:
            path.unlink()
            continue
        if round_ != p.global_step // h + 1:
            break
        trainer.apply_run_config()
        a, b = fragments.round_span(trainer.config, round_, trainer.n_elements)
        trainer.shared[a:b] = torch.from_numpy(np.load(path))
        apply_round(trainer, SyncOutcome(round_, True, 1.0, members, 0.0))
        path.unlink()
        applied += 1
    beyond_gap = bool(kept.rounds())
    if applied:
        trainer.apply_run_config()
        trainer.save()
    if applied and not beyond_gap:
        log.info("joined the swarm at round %d (%d rounds taken part in while the state "
                 "downloaded)", p.global_step // h, applied)
    return applied, beyond_gap


def join_swarm(trainer: Trainer) -> None:
    """Come into step with the swarm after downloading its state: apply the rounds taken
    part in meanwhile, or arrive at the next round with nothing to add and take the others'
    average. If the swarm moved on meanwhile, fetch its newer state and try again."""
    assert trainer.outer is not None
    h = fragments.interval(trainer.config)
    for _attempt in range(JOIN_ATTEMPTS):
        p = trainer.position
        if p.global_step >= trainer.config.training.max_steps:
            return
        p.global_step = p.global_step // h * h
        assign_from(trainer.params, trainer.outer.start)
        if trainer.overlap is not None:
            trainer.overlap.window.clear()  # the weights hold no local progress now
        applied, beyond_gap = apply_kept(trainer)
        if applied and not beyond_gap:
            return
        if not beyond_gap:
            round_ = p.global_step // h + 1
            outcome = take_part(trainer, round_)
            if averaged_in_full(outcome):
                apply_round(trainer, outcome)
                trainer.save()
                log.info("joined the swarm at round %d", round_)
                return
        else:
            log.info("the rounds taken part in do not follow on from step %d: fetching a "
                     "newer state, taking part on meanwhile", p.global_step)
        have = trainer.checkpoints.latest_step()
        if catch_up_taking_part(trainer, have, fresh=not beyond_gap) <= have:
            log.info("no newer state among peers; training on from step %d", have)
            return
        latest = trainer.checkpoints.latest()
        if latest is not None:
            trainer.restore(latest)


class LookAhead:
    """A peer that averages alone round after round may be alone because the others are
    rounds ahead of it (their announcements of the rounds it is in have expired, so nothing
    tells it it is late: a catch-up that failed on a network fault leaves it there). Once per
    ``LOOK_AHEAD_EVERY`` seconds of such rounds it asks for a newer state, and joins when
    there is one."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def after_alone_round(self, trainer: Trainer) -> None:
        """Local-steps mode (the trainer's boundary calls it)."""
        if time.monotonic() - self.last < LOOK_AHEAD_EVERY:
            return
        self.last = time.monotonic()
        if trainer.overlap is not None:
            trainer.overlap.drain()  # a catch-up needs the shared buffer
        catch_up_and_join(trainer)


def state_wait(trainer: Trainer, step: int) -> float:
    """Seconds a peer left behind at ``step`` waits for the others' state: they write it at
    their next checkpoint step (at the latest their last step), that many rounds away at the
    pace this peer saw, times ``WAIT_MARGIN``."""
    h = fragments.interval(trainer.config)
    every = trainer.config.checkpoint.every_steps
    written_at = min(-(-step // every) * every, trainer.config.training.max_steps)
    rounds = max(0, written_at - step) // h + 1
    pace = trainer.reports.round_interval or 0.0
    return max(MIN_WAIT, WAIT_MARGIN * rounds * pace)


def catch_up_and_join(trainer: Trainer, outcome: SyncOutcome | None = None) -> bool:
    """Behind the swarm: take its newer state and join it (``join_swarm``). Returns whether
    a newer state was loaded.

    When ``outcome`` says the others finished that round without this peer (``left_behind``),
    they took an outer step it did not. Until it holds their state, every round it averaged
    with them would be applied to other start weights than theirs, and it would stay apart
    from them for good. So it waits for that state: it trains no further, saves no
    checkpoint (one at that step would hide theirs), and asks again every ``WAIT_POLL``
    seconds until one of them has written a checkpoint at or past the round's end, for up to
    ``state_wait``. Only when none comes does it train on from its own state.
    """
    have = trainer.checkpoints.latest_step()
    wanted, deadline = -1, 0.0
    if outcome is not None and outcome.left_behind:
        wanted = outcome.round * fragments.interval(trainer.config)
        if have >= wanted:
            log.warning("left behind in round %d, but this peer holds a checkpoint of step "
                        "%d already: training on from it", outcome.round, have)
            wanted = -1
        else:
            trainer.left_behind_at = wanted
            wait = state_wait(trainer, wanted)
            deadline = time.monotonic() + wait
            log.info("left behind in round %d: waiting up to %.0f s for the others' state "
                     "of step %d or later", outcome.round, wait, wanted)
    while catch_up_taking_part(trainer, have) <= have:
        if wanted < 0 or trainer.stop_requested:
            return False
        if time.monotonic() >= deadline:
            log.warning("no peer offered a state of step %d or later in time: training on "
                        "alone from this peer's state, apart from the others", wanted)
            trainer.left_behind_at = None
            return False
        trainer.report("syncing", force=True)
        time.sleep(WAIT_POLL)
    trainer.left_behind_at = None
    latest = trainer.checkpoints.latest()
    if latest is None:
        return False
    trainer.restore(latest)
    if trainer.outer is not None:
        join_swarm(trainer)
    return True
