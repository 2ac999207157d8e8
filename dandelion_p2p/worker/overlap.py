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
  a guess made from its own delta_r (pushed half again as far from the momentum's mean:
  ``LOOK_AHEAD_REACH``) in place of the swarm's average, the momentum left as it is
  (``OuterNesterov.look_ahead``). G itself only ever takes the swarm's averages. Training on
  from G - delta_r instead left each round's local steps one outer step of momentum behind
  blocking mode's: 25 % (H = 5) and 37 % (H = 10) worse validation loss in
  ``benchmarks/quality.py``, against 2 % and 8 % with the look-ahead at reach 1. When the last round
  applied took no outer step (a peer alone), the worker trains on from G - delta_r; a peer
  with a daemon that turns out to be alone in its first round has started its second from
  the look-ahead point, and its G, which takes its own pseudo-gradients as they are, keeps
  that one step of extrapolation. Only the round's thread touches the shared buffer until it
  is waited for.
- A round that comes back averaged in full before the next boundary is applied then, at the
  first step after it is back (``poll``), and the local weights move by G_r minus the
  look-ahead point they started from: the rest of the round's local steps train on from G_r
  plus their own progress, as blocking mode's do, and the next pseudo-gradient is taken from
  G_r. On a fast network that is nearly all of the round.
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

With streaming (``sync.fragments`` > 1, ``fragments``) a boundary comes every H / F steps and
its round carries one fragment: delta, look-ahead, local start and the applied step are all
of that fragment's elements, and the other fragments train on untouched. Rounds queue up
(``flights``, at most one per fragment) and reach the daemon one at a time, in order; a
boundary waits only for the round that last synced its own fragment, H steps before, so a
round has H steps to finish rather than H / F. ``drain`` and
``_rebase`` work element by element, so they hold as they are. A checkpoint stores G as the
weights and this peer's progress apart (``checkpoint_tensors``): peers' drained weights
differ where fragments have progress not yet synced, and a joiner checks that the peers
offering a state agree on its weights.

The round runs on a thread only against a daemon (``DaemonLink``): a peer on several devices
averages inside collective calls that must stay in step with its ranks' gradient reductions,
so it averages at the boundary, as blocking mode does, and still applies the round one
boundary late, so its G follows the same sequence as every other peer's.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.worker import fragments
from dandelion_p2p.worker.link import DaemonLink, SyncOutcome
from dandelion_p2p.worker.model import assign_from, flat_views, flatten_into
from dandelion_p2p.worker.round_rules import OuterRule, log_not_applied, needs_catch_up, outer_rule

if TYPE_CHECKING:
    from dandelion_p2p.worker.checkpoint import Checkpoint
    from dandelion_p2p.worker.train import Trainer

log = logging.getLogger(__name__)

LOOK_AHEAD_REACH = 1.5
"""How far past this peer's own pseudo-gradient the look-ahead guesses the swarm's average
(``OuterNesterov.look_ahead``). Measured in ``benchmarks/quality.py`` (4 peers, the tiny
model, final validation loss against blocking mode's): at H = 10 reach 1 was 4-5 % behind
(three runs), 1.25 about 1 %, 1.5 0.4-1.9 % ahead (two each); at H = 16 runs spread too
widely to tell (reach 1: 0.3 % ahead to 12 % behind, four runs; 1.5: 2 % ahead to 16 %
behind, three), and at H = 50 1.5 was 1.6 % behind reach 1 (one run each):
benchmarks/README.md."""


class RoundInFlight:
    """One round being averaged, on a thread or (``threaded=False``) already done. A round's
    thread first waits for the round launched before it (``after``): a peer's rounds reach
    its daemon one at a time and in order, as every peer's do."""

    def __init__(self, round_: int, span: tuple[int, int], run: Callable[[], SyncOutcome],
                 threaded: bool, after: RoundInFlight | None = None, *, boundary: int,
                 config_version: int) -> None:
        self.round = round_
        self.span = span
        """[start, stop) of the elements the round averages (``fragments``)."""
        self.boundary = boundary
        """The global step whose boundary launched the round."""
        self.config_version = config_version
        """The run config version the round's local steps trained under."""
        self.launched = time.time()
        self.finished = 0.0
        self.outcome: SyncOutcome | None = None
        self.error: BaseException | None = None
        self.blocked = 0.0
        """Seconds the launch itself kept the worker from training (a round run inline)."""
        self.thread: threading.Thread | None = None
        if threaded:
            self.thread = threading.Thread(target=self._run, args=(run, after), daemon=True,
                                           name=f"round-{round_}")
            self.thread.start()
        else:
            started = time.monotonic()
            self._run(run, None)
            self.blocked = time.monotonic() - started

    @property
    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def _run(self, run: Callable[[], SyncOutcome], after: RoundInFlight | None) -> None:
        if after is not None and after.thread is not None:
            after.thread.join()
            self.launched = time.time()
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
        self.flights: collections.deque[RoundInFlight] = collections.deque()
        """The rounds launched and not applied yet, oldest first: at most one per fragment."""
        self.local_start: torch.Tensor | None = None
        """S while a round is in flight; None: the local start is ``outer.start`` (G)."""
        self.skipped: int | None = None
        """The round of the boundary that returned for a catch-up before starting it."""
        self.window: collections.deque[int] = collections.deque(
            maxlen=trainer.config.sync.fragments)
        """Samples trained in each of the last F intervals: a round's weight is their sum,
        the samples behind its fragment's delta (all H steps since the fragment's last
        sync; without streaming, the one interval since the last boundary)."""
        self.steps_outer = isinstance(trainer.link, DaemonLink)
        """Whether the round now being averaged is expected to take the outer step: the last
        round applied did (``OuterRule.STEP``). Before the first, a peer with a daemon expects
        a swarm, a peer on its own does not."""

    @property
    def in_flight(self) -> RoundInFlight | None:
        """The round launched last, if it is not applied yet."""
        return self.flights[-1] if self.flights else None

    def boundary(self) -> SyncOutcome | None:
        """At a round boundary: apply the rounds that are back, wait for the one that last
        synced this boundary's fragment (the round before, without streaming), start this
        one (and, at a checkpoint step, wait for it). Returns the outcome of the last round
        applied (None when none was). When an outcome says this peer is behind, no round is
        left in flight: the worker is drained for the catch-up, and this boundary's round is
        started by ``start_skipped_round`` when the catch-up finds no newer state."""
        t = self.t
        assert t.outer is not None
        p = t.position
        round_ = p.global_step // fragments.interval(t.config)
        a, b = span = fragments.round_span(t.config, round_, t.n_elements)
        self.skipped = None
        flatten_into(t.params, t.flat)
        outcome: SyncOutcome | None = None
        while self.flights and (self.flights[0].done
                                or any(f.span == span for f in self.flights)):
            outcome = self._apply_front()
            if needs_catch_up(outcome):
                while self.flights:
                    self._apply_front()
                self._rebase()
                self.skipped = round_
                return outcome
        start = self.local_start if self.local_start is not None else t.outer.start
        # Only this round's span (its fragment; all of the vector without streaming) is
        # synced now: the other fragments train on towards their own boundaries.
        torch.sub(start[a:b], t.flat[a:b], out=t.shared[a:b])
        if not bool(torch.isfinite(t.shared[a:b]).all()):
            raise FloatingPointError("the local steps produced non-finite weights")
        # Train on from where G will about land once this round is applied: the outer step
        # taken with a guess from this peer's own pseudo-gradient in place of the swarm's
        # average (when the last round applied took one), else G plus that pseudo-gradient
        # as it is.
        if self.steps_outer:
            t.outer.look_ahead(t.shared, t.flat, span, reach=LOOK_AHEAD_REACH)
        else:
            torch.sub(t.outer.start[a:b], t.shared[a:b], out=t.flat[a:b])
        if self.local_start is None:
            self.local_start = t.outer.start.clone()
        self.local_start[a:b] = t.flat[a:b]
        assign_from(t.params, t.flat)
        self.window.append(p.samples_since_sync)
        weight, p.samples_since_sync = sum(self.window), 0
        sync_span = fragments.named_span(t.config, span)
        link = t.link
        after = self.in_flight
        boundary, version = p.global_step, t.config_version
        if isinstance(link, DaemonLink) and t.peer_group.world == 1:
            # The version and first step the round trained under, taken now: the trainer
            # may switch versions at this boundary while the round runs.
            config = link.round_config_now()
            self.flights.append(RoundInFlight(
                round_, span, lambda: link.sync(round_, weight, "local_steps", config=config,
                                                learn=False, span=sync_span),
                threaded=True, after=after, boundary=boundary, config_version=version))
        else:
            self.flights.append(RoundInFlight(
                round_, span, lambda: link.sync(round_, weight, "local_steps", span=sync_span),
                threaded=False, boundary=boundary, config_version=version))
        if p.global_step % t.config.checkpoint.every_steps == 0:
            # The checkpoint written next must hold this round: wait for it here, where a
            # round this peer was left out of still sends it to catch up before the save.
            drained = self.drain()
            if drained is not None and needs_catch_up(drained):
                return drained
        return outcome

    def poll(self) -> None:
        """Between boundaries: apply the rounds that have come back averaged in full now
        rather than at a boundary. Applying a round moves the local weights of its span by
        what the swarm's average changed (``_apply_front``): from here those steps train on
        from G_r plus their own progress, as in blocking mode, instead of from the
        look-ahead, and the span's next pseudo-gradient is taken from G_r. G takes the same
        averages in the same order as before, so it stays bit-identical across peers
        whatever step each applies a round at. A round with any other outcome (alone,
        partial, left behind) waits for a boundary, whose rules it needs."""
        t = self.t
        applied = False
        while self.flights:
            flight = self.flights[0]
            if (not flight.done or flight.outcome is None
                    or outer_rule(flight.outcome, t.config.sync.outer_step_alone)
                    is not OuterRule.STEP):
                break
            if not applied:
                flatten_into(t.params, t.flat)
                applied = True
            self._apply_front()
        if applied:
            assign_from(t.params, t.flat)

    def start_skipped_round(self) -> SyncOutcome | None:
        """After a catch-up that loaded nothing, the worker still stands at the boundary whose
        round ``boundary`` left for it: start that round now. The others average it, and a
        peer that sat it out would apply every later round to other start weights than
        theirs. Returns what ``boundary`` returns."""
        round_, self.skipped = self.skipped, None
        if (round_ is None
                or self.t.position.global_step != round_ * fragments.interval(self.t.config)):
            return None
        return self.boundary()

    def checkpoint_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """With streaming, what a checkpoint writes in place of the weights. Drained, the
        weights are G plus each fragment's progress since its own last sync, which differs
        from peer to peer; but a checkpoint's ``trainable.safetensors`` is the swarm's state,
        whose hash a joiner compares across the peers that offer it. So it holds G, and this
        peer's progress goes to ``local.safetensors`` (``restore_local`` adds it back). Without
        fragments a checkpoint step's drained weights are G already: nothing changes."""
        t = self.t
        assert t.outer is not None
        if t.config.sync.fragments == 1:
            return {}
        flatten_into(t.params, t.flat)
        g = t.outer.start
        trainable = {name: part.to(param.dtype) for (name, param), (_, part)
                     in zip(t.c.trainable, flat_views(t.params, g), strict=True)}
        window = torch.tensor(list(self.window), dtype=torch.int64)
        return {"trainable": trainable, "local": {"progress": t.flat - g, "window": window}}

    def restore_local(self, checkpoint: Checkpoint) -> None:
        """After a checkpoint's weights (G, with streaming) are loaded: add back the progress
        of the peer that wrote it (``checkpoint_tensors``). A joiner's join then sets its
        weights to G."""
        if not checkpoint.has("local.safetensors"):
            return
        t = self.t
        progress = checkpoint.tensors("local")["progress"]
        if progress.shape != t.flat.shape:
            raise ConfigError(f"checkpoint {checkpoint.path}: local progress of "
                              f"{progress.numel()} elements for {t.n_elements} parameters")
        flatten_into(t.params, t.flat)
        t.flat.add_(progress)
        assign_from(t.params, t.flat)
        self.window.clear()
        self.window.extend(int(x) for x in checkpoint.tensors("local").get(
            "window", torch.zeros(0, dtype=torch.int64)).tolist())

    def drain(self) -> SyncOutcome | None:
        """Wait for the rounds in flight, apply them, and go back to the blocking mode's form
        (local start = G). Returns the outcome of the last round applied (None: none was),
        or the first that sends this peer to catch up."""
        t = self.t
        if self.local_start is None:
            return None
        flatten_into(t.params, t.flat)
        outcome: SyncOutcome | None = None
        while self.flights:
            applied = self._apply_front()
            if outcome is None or not needs_catch_up(outcome):
                outcome = applied
        self._rebase()
        return outcome

    def _rebase(self) -> None:
        """Weights = G minus the local progress since the local start; local start = G.
        (``t.flat`` holds the current weights.) Once every round is applied the local start
        is G already (``_apply_front``) and the weights stay as they are."""
        t = self.t
        assert t.outer is not None
        if self.local_start is None:
            return
        torch.sub(self.local_start, t.flat, out=t.flat)
        torch.sub(t.outer.start, t.flat, out=t.flat)
        assign_from(t.params, t.flat)
        self.local_start = None

    def _apply_front(self) -> SyncOutcome:
        """Wait for the oldest round in flight and apply it by the round rules to its span of
        G; the local weights of that span (in ``t.flat``, which the caller assigns) move by
        what G's span moved from the local start, and the local start there becomes G. At
        the boundary of the same span that gives the pseudo-gradient and the look-ahead
        the boundary would have computed without it; between boundaries it is the eager
        correction (``poll``)."""
        t = self.t
        outer = t.outer
        assert outer is not None and self.local_start is not None
        flight = self.flights.popleft()
        started = time.monotonic()
        if not flight.done:
            t.report("syncing", force=True)
        outcome = flight.wait()
        waited = flight.blocked + time.monotonic() - started
        if isinstance(t.link, DaemonLink):
            t.link.learn_pending()
        rule = outer_rule(outcome, t.config.sync.outer_step_alone)
        self.steps_outer = rule is OuterRule.STEP
        a, b = flight.span
        if rule is OuterRule.STEP:
            t.checkpoints.rounds.add(outcome.round, outcome.members, t.shared[a:b].numpy(),
                                     t.config.averaging.codec)
            outer.step(t.shared, flight.span)
        elif rule is OuterRule.NONE:
            log_not_applied(outcome)
        else:
            # Alone: the buffer holds this peer's own pseudo-gradient, untouched.
            outer.start[a:b].sub_(t.shared[a:b])
            t.checkpoints.rounds.applied_alone()
        # G minus the progress since the local start: exactly G where there is none (a
        # checkpoint's weights, whose hash peers compare).
        g = outer.start[a:b]
        torch.sub(self.local_start[a:b], t.flat[a:b], out=t.flat[a:b])
        torch.sub(g, t.flat[a:b], out=t.flat[a:b])
        self.local_start[a:b] = g
        p = t.position
        samples = p.samples_since_sync  # of the round training now, not the one applied
        # When the round ran (wall clock, as ``train_log.jsonl``'s times): the steps trained
        # meanwhile are the overlap.
        named = fragments.named_span(t.config, flight.span)
        t.after_sync(outcome, outer.start, waited=waited,
                     extra={"boundary": flight.boundary,
                            "config_version": flight.config_version,
                            "launched": round(flight.launched, 3),
                            "finished": round(flight.finished, 3),
                            **({"span": list(named)} if named is not None else {})})
        p.samples_since_sync = samples
        return outcome
