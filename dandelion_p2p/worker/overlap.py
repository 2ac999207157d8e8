"""Local steps that go on while the swarm averages (``sync.overlap``).

In blocking local-steps mode the worker stops at every round boundary until its daemon has
averaged the pseudo-gradient. Here round r's pseudo-gradient is averaged while round r+1's
local steps train, and its outer step is applied at the next boundary, one round late:

- ``outer.start`` holds G, the global weights. Every peer applies the same averaged
  pseudo-gradients to the same G in the same order, so G is bit-identical on every peer after
  every applied round (the sync log's digest is of G).
- At the boundary of round r, with L the weights now and S where this round's local steps
  started: delta_r = S - L. The worker waits for round r-1 (the only time it does not train),
  applies it to G, writes delta_r into the shared buffer, starts round r on a thread and trains
  on from L = S = where G will about land once round r is applied: the outer step taken with
  its own delta_r in place of the swarm's average, the momentum left as it is
  (``OuterNesterov.look_ahead``). G itself only ever takes the swarm's averages. Training on
  from G - delta_r instead left each round's local steps one outer step of momentum behind
  blocking mode's: 25 % (H = 5) and 37 % (H = 10) worse validation loss in
  ``benchmarks/quality.py``, against 2 % and 8 % with the look-ahead. When the last round
  applied took no outer step (a peer alone), the worker trains on from G - delta_r; a peer
  with a daemon that turns out to be alone in its first round has started its second from
  the look-ahead point, and its G, which takes its own pseudo-gradients as they are, keeps
  that one step of extrapolation. Only the round's thread touches the shared buffer until it
  is waited for.
- Which rounds are applied is the blocking mode's rule (``round_rules``): only a round that
  averaged the whole vector; a round alone lets G take the peer's own pseudo-gradient as it
  is (without ``sync.outer_step_alone``: a lone peer's weights are what its inner optimizer
  made of them, one round later). A round applied by no peer drops its local progress.
- Peers are held together only by that wait: a peer more than one round ahead waits for the
  round the others have not joined yet. A round gathers for up to ``averaging.gather_window``
  the peers of the last one; with overlap that gathering runs while the peers train, so a
  window near the time of H local steps keeps a slower peer in every round at no cost, where
  a short one lets its lag grow until it misses rounds and catches up.
- A round applied that says this peer is behind sends it to catch up before this boundary's
  round starts. When the catch-up loads no newer state, the round still starts
  (``start_skipped_round``): the others average it, and a peer that sat it out would hold
  other global weights than theirs from then on, every later round averaged with them
  notwithstanding.
- ``drain``: wait for the round in flight, apply it, and put the worker back into the blocking
  mode's form: the local start is G again and the weights are G minus the local progress since
  the boundary. Every path the blocking mode has (checkpoint, stop, catch-up, joining, export)
  runs drained, so a checkpoint holds a state of the swarm that a joiner or a restarted
  worker uses exactly as in blocking mode; a boundary that is a checkpoint step therefore
  waits for its own round. A worker restarted from a checkpoint misses the round that was in
  flight when it died and, like any late peer, catches up from the swarm.

The round runs on a thread only against a daemon (``DaemonLink``): a peer on several devices
averages inside collective calls that must stay in step with its ranks' gradient reductions,
so it averages at the boundary, as blocking mode does, and still applies the round one
boundary late, so its G follows the same sequence as every other peer's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from dandelion_p2p.worker.link import DaemonLink, SyncOutcome
from dandelion_p2p.worker.model import assign_from, flatten_into
from dandelion_p2p.worker.round_rules import OuterRule, log_not_applied, needs_catch_up, outer_rule

if TYPE_CHECKING:
    from dandelion_p2p.worker.train import Trainer

log = logging.getLogger(__name__)


class RoundInFlight:
    """One round being averaged, on a thread or (``threaded=False``) already done."""

    def __init__(self, round_: int, run: Callable[[], SyncOutcome], threaded: bool) -> None:
        self.round = round_
        self.launched = time.time()
        self.finished = 0.0
        self.outcome: SyncOutcome | None = None
        self.error: BaseException | None = None
        self.blocked = 0.0
        """Seconds the launch itself kept the worker from training (a round run inline)."""
        self.thread: threading.Thread | None = None
        if threaded:
            self.thread = threading.Thread(target=self._run, args=(run,), daemon=True,
                                           name=f"round-{round_}")
            self.thread.start()
        else:
            started = time.monotonic()
            self._run(run)
            self.blocked = time.monotonic() - started

    def _run(self, run: Callable[[], SyncOutcome]) -> None:
        try:
            self.outcome = run()
        except BaseException as exc:  # raised again on the trainer's thread by ``wait``
            self.error = exc
        self.finished = time.time()

    def wait(self) -> SyncOutcome:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome


class Overlap:
    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer
        self.in_flight: RoundInFlight | None = None
        self.local_start: torch.Tensor | None = None
        """S while a round is in flight; None: the local start is ``outer.start`` (G)."""
        self.skipped: int | None = None
        """The round of the boundary that returned for a catch-up before starting it."""
        self.steps_outer = isinstance(trainer.link, DaemonLink)
        """Whether the round now being averaged is expected to take the outer step: the last
        round applied did (``OuterRule.STEP``). Before the first, a peer with a daemon expects
        a swarm, a peer on its own does not."""

    def boundary(self) -> SyncOutcome | None:
        """At a round boundary: apply the round in flight, start this one (and, at a
        checkpoint step, wait for it). Returns the outcome of the round applied (None when
        none was). When that outcome says this peer is behind, no round is left in flight:
        the worker is drained for the catch-up, and this boundary's round is started by
        ``start_skipped_round`` when the catch-up finds no newer state."""
        t = self.t
        assert t.outer is not None
        p = t.position
        round_ = p.global_step // t.config.sync.local_steps
        self.skipped = None
        flatten_into(t.params, t.flat)
        outcome = self._apply_in_flight()
        if outcome is not None and needs_catch_up(outcome):
            self._rebase()
            self.skipped = round_
            return outcome
        start = self.local_start if self.local_start is not None else t.outer.start
        torch.sub(start, t.flat, out=t.shared)
        if not bool(torch.isfinite(t.shared).all()):
            raise FloatingPointError("the local steps produced non-finite weights")
        # Train on from where G will about land once this round is applied: the outer step
        # taken with this peer's own pseudo-gradient in place of the swarm's average (when
        # the last round applied took one), else G plus that pseudo-gradient as it is.
        if self.steps_outer:
            t.outer.look_ahead(t.shared, t.flat)
        else:
            torch.sub(t.outer.start, t.shared, out=t.flat)
        if self.local_start is None:
            self.local_start = t.flat.clone()
        else:
            self.local_start.copy_(t.flat)
        assign_from(t.params, t.flat)
        weight, p.samples_since_sync = p.samples_since_sync, 0
        link = t.link
        if isinstance(link, DaemonLink) and t.peer_group.world == 1:
            # The version and first step the round trained under, taken now: the trainer
            # may switch versions at this boundary while the round runs.
            config = link.round_config_now()
            self.in_flight = RoundInFlight(
                round_, lambda: link.sync(round_, weight, "local_steps", config=config,
                                          learn=False), threaded=True)
        else:
            self.in_flight = RoundInFlight(
                round_, lambda: link.sync(round_, weight, "local_steps"), threaded=False)
        if p.global_step % t.config.checkpoint.every_steps == 0:
            # The checkpoint written next must hold this round: wait for it here, where a
            # round this peer was left out of still sends it to catch up before the save.
            drained = self.drain()
            if drained is not None and needs_catch_up(drained):
                return drained
        return outcome

    def start_skipped_round(self) -> SyncOutcome | None:
        """After a catch-up that loaded nothing, the worker still stands at the boundary whose
        round ``boundary`` left for it: start that round now. The others average it, and a
        peer that sat it out would apply every later round to other start weights than
        theirs. Returns what ``boundary`` returns."""
        round_, self.skipped = self.skipped, None
        if round_ is None or self.t.position.global_step != round_ * self.t.config.sync.local_steps:
            return None
        return self.boundary()

    def drain(self) -> SyncOutcome | None:
        """Wait for the round in flight, apply it, and go back to the blocking mode's form
        (local start = G). Returns the outcome applied, if a round was in flight."""
        if self.in_flight is None:
            return None
        flatten_into(self.t.params, self.t.flat)
        outcome = self._apply_in_flight()
        self._rebase()
        return outcome

    def _rebase(self) -> None:
        """Weights = G minus the local progress since the local start; local start = G.
        (``t.flat`` holds the current weights.)"""
        t = self.t
        assert t.outer is not None
        if self.local_start is None:
            return
        torch.sub(self.local_start, t.flat, out=t.flat)
        torch.sub(t.outer.start, t.flat, out=t.flat)
        assign_from(t.params, t.flat)
        self.local_start = None

    def _apply_in_flight(self) -> SyncOutcome | None:
        t = self.t
        outer = t.outer
        assert outer is not None
        flight, self.in_flight = self.in_flight, None
        if flight is None:
            return None
        started = time.monotonic()
        if flight.thread is not None and flight.thread.is_alive():
            t.report("syncing", force=True)
        outcome = flight.wait()
        waited = flight.blocked + time.monotonic() - started
        if isinstance(t.link, DaemonLink):
            t.link.learn_pending()
        rule = outer_rule(outcome, t.config.sync.outer_step_alone)
        self.steps_outer = rule is OuterRule.STEP
        if rule is OuterRule.STEP:
            outer.step(t.shared)
        elif rule is OuterRule.NONE:
            log_not_applied(outcome)
        else:
            # Alone: the buffer holds this peer's own pseudo-gradient, untouched.
            outer.start.sub_(t.shared)
        p = t.position
        samples = p.samples_since_sync  # of the round training now, not the one applied
        # When the round ran (wall clock, as ``train_log.jsonl``'s times): the steps trained
        # meanwhile are the overlap.
        t.after_sync(outcome, outer.start, waited=waited,
                     extra={"launched": round(flight.launched, 3),
                            "finished": round(flight.finished, 3)})
        p.samples_since_sync = samples
        return outcome
