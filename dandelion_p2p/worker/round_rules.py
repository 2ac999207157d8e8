"""Which local-steps rounds take an outer step: one rule for the blocking and the overlapped
mode, so that every peer of a round makes the same choice from what its round reported.

Every peer holds the same global weights G only while all of them apply the same averages to
the same G in the same order. A round is therefore applied (``STEP``) only when this peer's
whole vector was averaged. Applied by no peer (``NONE``), leaving G as it was and giving up
the round's local progress:

- a round that averaged only part of the vector: a member died mid-round, or the members saw
  different announcements, so one member's span is missing. The elements left at each peer's
  own values differ between peers, and G must not; every member of such a round misses the
  same span and skips the round, so the members stay identical;
- a round that found others but averaged nothing (the group finished without this peer, or
  failed as a whole): peers that all saw it fail keep the same G, and a peer that others left
  behind catches up (``needs_catch_up``);
- a round its daemon cut short because it is stopping: a swarm that stops together keeps the
  same G, so its last checkpoints agree.

A round alone (nobody else was there, ``ALONE``) lets G take the peer's own progress as it
is, or take the outer step on it when the run says ``sync.outer_step_alone``.
"""

from __future__ import annotations

import enum
import logging

from dandelion_p2p.worker.link import SyncOutcome

log = logging.getLogger(__name__)


class OuterRule(enum.Enum):
    STEP = "step"
    """Take the outer step with the averaged pseudo-gradient."""
    NONE = "none"
    """G stays as it was; the round's local progress is given up."""
    ALONE = "alone"
    """G becomes the peer's own weights (its own progress, not extrapolated)."""


def needs_catch_up(outcome: SyncOutcome) -> bool:
    """Others were there but this peer could not average with them: it is behind (or went
    alone for a while), and takes the swarm's state."""
    return not outcome.averaged and (outcome.members > 1 or outcome.behind)


def averaged_in_full(outcome: SyncOutcome) -> bool:
    """This peer's whole vector was averaged with others: the round's outer step is taken."""
    return outcome.averaged and outcome.fraction_averaged == 1.0


def alone(outcome: SyncOutcome) -> bool:
    """Nobody else was there (or the daemon could not reach the swarm)."""
    return not (outcome.averaged or outcome.stopping or needs_catch_up(outcome))


def outer_rule(outcome: SyncOutcome, outer_step_alone: bool) -> OuterRule:
    if averaged_in_full(outcome):
        return OuterRule.STEP
    if not alone(outcome):
        return OuterRule.NONE
    return OuterRule.STEP if outer_step_alone else OuterRule.ALONE


def log_not_applied(outcome: SyncOutcome) -> None:
    log.info("round %d: %.0f%% of the vector averaged with %d members: applied by no peer",
             outcome.round, 100 * outcome.fraction_averaged, outcome.members)
