"""Joining the swarm mid-run, whatever the size of its state.

A joiner downloads the swarm's newest checkpoint through its daemon (``Link.catch_up``). On a
home link that can take several sync intervals, and the swarm does not wait: once the files
are in, the step downloaded is rounds behind. Every peer keeps the averaged pseudo-gradients
of its last rounds (``served_rounds``, ``rounds_to_keep``), so the joiner then fetches
those of the rounds since its state (``Link.fetch_rounds``, into ``WORK/joining/``) and
applies their outer steps in order, as every peer applied them: it then holds the swarm's
weights and momentum bit for bit. It takes part in the next round with nothing to add
(weight 0) and takes the swarm's result; a round the swarm finished meanwhile is fetched and
applied in turn. While it downloads it takes part in no round, so its slow link costs the
others nothing.

When the peers keep no round that follows on from the state loaded (a download that outlasted
the rounds they keep), the joiner fetches a newer state and tries again.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dandelion_p2p.errors import DandelionError
from dandelion_p2p.worker import fragments, restoring
from dandelion_p2p.worker.link import DaemonLink, SyncOutcome
from dandelion_p2p.worker.model import assign_from, flatten_into
from dandelion_p2p.worker.protocol import round_files
from dandelion_p2p.worker.round_rules import averaged_in_full
from dandelion_p2p.worker.served_rounds import (
    decode_round,
    encode_round,
    max_file_size,
    rounds_to_keep,
    write_round,
)

if TYPE_CHECKING:
    from dandelion_p2p.worker.train import Trainer

log = logging.getLogger(__name__)

WAIT_POLL = 1.0
"""Seconds between two asks for the state of a round this peer was left behind in."""
REPLAY_FETCHES = 8
"""Fetches of kept rounds in one replay while each brings more than one round: a swarm
whose rounds are shorter than a fetch is then met by taking part a round ahead."""
FETCH_POLL = 0.2
"""Seconds between two asks for the round a joiner missed, while it takes part in the next."""
REJOIN_WAIT = 5.0
"""Least seconds a peer left behind asks for the round it missed before it waits for a
state instead (``rejoin_by_replay``)."""
WAIT_MARGIN = 3.0
MIN_WAIT = 30.0
"""Least seconds a peer left behind waits for the others' state (``state_wait``)."""
JOIN_ATTEMPTS = 5
LOOK_AHEAD_EVERY = 60.0
"""Seconds between two asks for a newer state while this peer averages alone."""


class KeptRounds:
    """The averaged pseudo-gradients of the rounds a joiner fetched to replay, one file each
    (``round-RRRRRRRR-M.bin``, M the round's members, as ``served_rounds`` lays it out)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def keep(self, round_: int, members: int, vector: np.ndarray, codec: str = "none") -> None:
        write_round(self.folder, round_, members, encode_round(vector, codec))

    def rounds(self) -> dict[int, tuple[Path, int]]:
        """Round -> (its file, its members), in round order."""
        return round_files(self.folder)


@dataclass
class ReplayTally:
    """The rounds of others this peer applied from the rounds peers keep since its state
    loaded: a join that gave up, the rounds it then trained, and a rejoin after being left
    behind do not start it again; a state loaded does (a peer that loaded none started from
    the weights of step 0)."""

    loaded_step: int = 0
    replayed: int = 0


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


def catch_up(trainer: Trainer, have: int, *, wait: bool = False) -> int:
    """``Link.catch_up(have)``: the step downloaded (without the files this peer has no use
    for, ``restoring.leave_out``), or -1. The rounds this peer kept for joiners are forgotten
    once a newer state is in: they led to its old state, maybe not to the swarm's."""
    got = trainer.link.catch_up(have, trainer.checkpoints.root, wait=wait,
                                leave_out=restoring.leave_out(trainer))
    if got > have:
        trainer.checkpoints.rounds.clear()
    return got


def replay(trainer: Trainer) -> tuple[int, bool]:
    """Fetch the averaged rounds that peers keep after this peer's round and apply them in
    order, again while that brings new ones (the swarm ran rounds during the fetch).
    Returns how many were applied, and whether peers keep newer rounds that do not follow on
    (the state is older than the oldest round they keep)."""
    link = trainer.link
    if not isinstance(link, DaemonLink):
        return 0, False
    h = fragments.interval(trainer.config)
    kept = kept_rounds(trainer)
    total = 0
    for _fetch in range(REPLAY_FETCHES):
        _, newest = link.fetch_rounds(trainer.position.global_step // h, kept.folder,
                                      max_file_size(trainer.n_elements))
        applied = apply_kept(trainer)
        total += applied
        # One round or none came in: the swarm is at most a round ahead now.
        if applied <= 1 or trainer.stop_requested:
            return total, newest > trainer.position.global_step // h
    return total, False


def _patience(trainer: Trainer) -> float:
    """Seconds a joiner waits on the swarm: ``WAIT_MARGIN`` rounds at the pace seen, at
    least ``MIN_WAIT``."""
    return max(MIN_WAIT, WAIT_MARGIN * (trainer.reports.round_interval or 0.0))


def take_part_fetching(trainer: Trainer, round_: int) -> tuple[SyncOutcome, bool]:
    """Take part in round ``round_`` while fetching round ``round_ - 1``, which the others
    are finishing: a swarm whose rounds are shorter than this peer's fetch and apply is met
    one round ahead. The round's average is kept beside the fetched rounds, for
    ``apply_kept``. Returns the outcome, and whether round ``round_ - 1`` came in (asked
    again every ``FETCH_POLL`` seconds for up to ``_patience``)."""
    link = trainer.link
    assert isinstance(link, DaemonLink)
    h = fragments.interval(trainer.config)
    kept = kept_rounds(trainer)
    after = trainer.position.global_step // h
    deadline = time.monotonic() + _patience(trainer)
    fetched, took_part = threading.Event(), threading.Event()

    def fetch() -> None:
        # Once round ``round_`` is over, ``round_ - 1`` is too: one more ask then settles it.
        try:
            while not trainer.stop_requested and time.monotonic() < deadline:
                last = took_part.is_set()
                got, _ = link.fetch_rounds(after, kept.folder, max_file_size(trainer.n_elements))
                if round_ - 1 in got:
                    fetched.set()
                    return
                if last:
                    return
                time.sleep(FETCH_POLL)
        except DandelionError as exc:
            log.info("fetching round %d: %s", round_ - 1, exc)

    thread = threading.Thread(target=fetch, name="fetch-round", daemon=True)
    thread.start()
    try:
        outcome = take_part(trainer, round_)
    finally:
        took_part.set()
    if averaged_in_full(outcome):
        a, b = fragments.round_span(trainer.config, round_, trainer.n_elements)
        kept.keep(round_, outcome.members, trainer.shared[a:b].numpy())
    thread.join()
    return outcome, fetched.is_set()


def apply_round(trainer: Trainer, outcome: SyncOutcome) -> None:
    """The outer step of the round whose average the shared buffer holds, as every member
    of it takes it: the weights move to the new start and the global step to the round's
    end. The round is kept for later joiners, as every member keeps it."""
    assert trainer.outer is not None
    span = fragments.round_span(trainer.config, outcome.round, trainer.n_elements)
    a, b = span
    trainer.checkpoints.rounds.add(outcome.round, outcome.members, trainer.shared[a:b].numpy(),
                                   trainer.config.averaging.codec)
    new_start = trainer.outer.step(trainer.shared, span)
    assign_from(trainer.params, new_start)
    trainer.position.global_step += fragments.interval(trainer.config)
    trainer.after_sync(outcome, new_start)


def _load_round(path: Path, elements: int) -> np.ndarray | None:
    """A kept round's ``elements`` values, or None (logged) when the file holds anything
    else. Its hash matched what most peers offered, but those peers may have lied together:
    such a round is not applied, and the chain ends before it."""
    try:
        return decode_round(path.read_bytes(), elements)
    except (OSError, ValueError) as exc:
        log.warning("kept round %s cannot be applied: %s", path.name, exc)
        return None


def apply_kept(trainer: Trainer) -> int:
    """Apply the outer steps of the kept rounds that follow on from the loaded state, in
    order, as the swarm applied them; returns how many. The rounds applied and those the
    state already holds are deleted."""
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
        vector = _load_round(path, b - a)
        if vector is None:
            path.unlink(missing_ok=True)
            break
        trainer.shared[a:b] = torch.from_numpy(vector)
        apply_round(trainer, SyncOutcome(round_, True, 1.0, members, 0.0))
        path.unlink()
        applied += 1
    if applied:
        trainer.apply_run_config()
    return applied


def join_swarm(trainer: Trainer, *, save: bool = True) -> None:
    """Come into step with the swarm after downloading its state: apply the rounds it
    averaged since (``replay``), then arrive at the next round with nothing to add and take
    the others' average. Having come too late for that round, it takes part in the one after
    while fetching the one it missed (``take_part_fetching``), unless fetching the rounds
    peers keep brought in the one it missed first: the next may then not have begun. When
    the peers keep no round that follows on from the state, a newer state is fetched. Once
    in step it saves a checkpoint (``save``): a restart then starts from the swarm's state
    rather than the older one downloaded."""
    assert trainer.outer is not None
    h = fragments.interval(trainer.config)
    # The round the others formed without this peer (0: none), and whether fetching it while
    # taking part in the next brought nothing.
    missed, unfetched = 0, False
    # Arriving before the others (they still train the round) finds nobody within the
    # gathering window: such tries cost no attempt for a while.
    early_until = time.monotonic() + _patience(trainer)
    attempt = 0
    while attempt < JOIN_ATTEMPTS:
        p = trainer.position
        if p.global_step >= trainer.config.training.max_steps or trainer.stop_requested:
            return
        p.global_step = p.global_step // h * h
        assign_from(trainer.params, trainer.outer.start)
        if trainer.overlap is not None:
            trainer.overlap.window.clear()  # the weights hold no local progress now
        applied, gap = replay(trainer)
        trainer.replays.replayed += applied
        if missed and p.global_step // h >= missed:
            # The round missed is applied now: the next may not have begun, and taking part
            # in it (or learning that the others began it without this peer) beats waiting
            # for the one after.
            missed = 0
        if gap or (unfetched and not applied):
            # Peers keep no round that follows on, or none of the round just missed.
            log.info("the rounds peers keep do not follow on from step %d: fetching a newer "
                     "state", p.global_step)
            have = trainer.checkpoints.latest_step()
            if catch_up(trainer, have) <= have:
                log.info("no newer state among peers; training on from step %d", have)
                return
            latest = trainer.checkpoints.latest()
            if latest is not None:
                trainer.restore(latest)
            missed, unfetched = 0, False
            attempt += 1
            continue
        round_ = p.global_step // h + 1
        if missed and isinstance(trainer.link, DaemonLink):
            outcome, fetched = take_part_fetching(trainer, round_ + 1)
            unfetched = not fetched
            if averaged_in_full(outcome) and fetched:
                trainer.replays.replayed += apply_kept(trainer) - 1
                if p.global_step // h == round_ + 1:
                    _joined(trainer, round_ + 1, save)
                    return
        else:
            outcome = take_part(trainer, round_)
            if averaged_in_full(outcome):
                apply_round(trainer, outcome)
                _joined(trainer, round_, save)
                return
        if outcome.stopping:
            return
        # Others formed the round without this peer (it came late): the next try takes part
        # in the round after, fetching this one meanwhile.
        missed = outcome.round if outcome.members > 1 or outcome.behind else 0
        if missed or time.monotonic() >= early_until:
            attempt += 1
        elif outcome.seconds < WAIT_POLL:
            time.sleep(WAIT_POLL)
    log.warning("could not join the swarm's rounds in %d tries: training on from step %d",
                JOIN_ATTEMPTS, trainer.position.global_step)


def _joined(trainer: Trainer, round_: int, save: bool) -> None:
    if save:
        trainer.save()
    kept_rounds(trainer).clear()
    tally = trainer.replays
    log.info("joined the swarm at round %d (%d rounds replayed since the state of step %d "
             "loaded)", round_, tally.replayed, tally.loaded_step)


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


def rejoin_by_replay(trainer: Trainer, round_: int) -> bool:
    """Left behind in round ``round_`` right after applying round ``round_ - 1`` with
    others: this peer's global weights are those the others applied round ``round_`` to, so
    fetching that round and the ones since from the peers that keep them, and applying
    them, puts it where the others are: a few rounds' bytes instead of a whole state, and
    no wait for their next checkpoint. Then it joins the next round as a joiner does. Returns
    whether it did; when the peers keep no such round (or this peer's last round was
    another, applied alone or by nobody), nothing changes and it waits for a state.
    Not done by a peer on several devices (its ranks stay in step through collective calls
    that a replay would skip), nor across a config version that changed the round length
    (the round's first step would be counted in the wrong one)."""
    outer = trainer.outer
    if (outer is None or not isinstance(trainer.link, DaemonLink)
            or trainer.peer_group.world > 1
            or rounds_to_keep(trainer.config) == 0
            or trainer.checkpoints.rounds.last_added != round_ - 1):
        return False
    h = fragments.interval(trainer.config)
    p = trainer.position
    rejoin_at = (round_ - 1) * h
    for at in (rejoin_at, p.global_step):
        version = trainer.link.run_configs.in_force(at)
        if version is not None and fragments.interval(version.config) != h:
            return False
    flatten_into(trainer.params, trainer.flat)
    step, weights = p.global_step, trainer.flat.clone()
    window = list(trainer.overlap.window) if trainer.overlap is not None else []
    kept_rounds(trainer).clear()
    p.global_step = rejoin_at
    assign_from(trainer.params, outer.start)
    if trainer.overlap is not None:
        trainer.overlap.window.clear()
    # The others write each round's file on a thread once it is applied: a fetch right
    # after they finished may find none yet.
    deadline = time.monotonic() + max(REJOIN_WAIT, 2 * (trainer.reports.round_interval or 0.0))
    while True:
        applied, gap = replay(trainer)
        if (applied or gap or trainer.stop_requested or time.monotonic() >= deadline):
            break
        time.sleep(FETCH_POLL)
    if not applied:
        p.global_step = step
        assign_from(trainer.params, weights)
        if trainer.overlap is not None:
            trainer.overlap.window.extend(window)
        kept_rounds(trainer).clear()
        trainer.apply_run_config()
        return False
    trainer.replays.replayed += applied
    log.info("left behind in round %d: replayed %d rounds that peers keep, joining the next",
             round_, applied)
    # No checkpoint of its own on joining: it has its own already, and a state of several
    # GB written after every stall would keep it from training for as long again.
    join_swarm(trainer, save=False)
    return True


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
        elif rejoin_by_replay(trainer, outcome.round):
            return True
        else:
            trainer.left_behind_at = wanted
            wait = state_wait(trainer, wanted)
            deadline = time.monotonic() + wait
            log.info("left behind in round %d: waiting up to %.0f s for the others' state "
                     "of step %d or later", outcome.round, wait, wanted)
    while catch_up(trainer, have) <= have:
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
