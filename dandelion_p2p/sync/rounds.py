"""Averaging rounds: the daemon's answer to ``worker.sync``.

The worker has put its pseudo-gradient (or gradient) into the shared buffer; the daemon
averages the buffer in place with the round's group and says how much was averaged. Peers on
different run config versions never average together: the version is part of the group's
identity, and a worker that trained a round under a version no longer in force is answered
"not averaged, behind", which sends it to catch up.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import numpy as np
import trio

from dandelion_p2p.averaging.averager import Averager, AveragingSettings, NoGroup
from dandelion_p2p.averaging.compression import BufferErrorFeedback
from dandelion_p2p.averaging.matchmaking import MatchmakingSettings, group_run_key
from dandelion_p2p.errors import ConfigError, DandelionError
from dandelion_p2p.identity import PeerId
from dandelion_p2p.runconfig.schema import MAX_FRAGMENTS
from dandelion_p2p.sync.runsource import CurrentRun, RunDocument
from dandelion_p2p.sync.state import TrainingState
from dandelion_p2p.telemetry import Telemetry
from dandelion_p2p.worker import protocol
from dandelion_p2p.worker.shm import SharedVector

log = logging.getLogger(__name__)

MIN_PATIENCE = 60.0
"""Seconds a peer waits at a sync point for the group it averaged with last time (a peer
whose worker restarts from its checkpoint comes back within this); a peer that found nobody
last time tries once per round."""

LEAVING_TIMEOUT = 3.0
"""Seconds a stopping daemon spends telling the others it leaves."""

SERIES_HELP = {
    "round_seconds": "seconds an averaging round took",
    "fraction_averaged": "fraction of the vector averaged with other peers in a round",
    "round_peers": "peers in the last averaging round",
}


class Averagers(Protocol):
    """Makes the averager of one group identity (run, config version) and retires it."""

    def create(self, run: bytes, settings: AveragingSettings) -> Averager: ...

    def retire(self, averager: Averager) -> None: ...


def not_averaged(members: int = 1) -> dict[str, Any]:
    """A round's answer when nothing was averaged: the buffer holds the worker's own values."""
    return {"averaged": False, "fraction_averaged": 0.0, "members": members,
            "complete": False}


async def _went_on(averager: Averager, round_: int) -> bool:
    """Whether a peer this one expects in ``round_`` announced the round after it: it went on
    without this round (it skipped it, as a peer that took the swarm's state does), and
    waiting for it here would last the whole patience while it waits in the next round."""
    try:
        expected = await averager.matchmaker.expected_in(averager.run, round_)
        later = await averager.matchmaker.read(averager.run, round_ + 1)
    except DandelionError:
        return False
    return any(peer in expected and peer != averager.me and not announcement.leaving
               for peer, announcement in later.items())


class Rounds:
    def __init__(self, state: TrainingState, current: CurrentRun, averagers: Averagers,
                 telemetry: Telemetry) -> None:
        self.state = state
        self.current = current
        self.averagers = averagers
        self.telemetry = telemetry
        self.averager: Averager | None = None
        self.averager_key = b""
        self._feedback: dict[int, BufferErrorFeedback] = {}
        """Error feedback per fragment (keyed by where it starts in the buffer)."""
        self.grouped_last = True
        """The last round found a group: wait for it (``MIN_PATIENCE``) in this one."""
        self.last_round: dict[str, Any] | None = None
        self.latest_round = -1
        """The newest round a sync was asked for (-1: none yet)."""

    async def sync(self, buffer: SharedVector, round_: int, weight: float,
                   trained_under: int, first_step: int, known: int,
                   span: tuple[int, int] | None = None) -> dict[str, Any]:
        """Average ``buffer`` (``span``: only its elements [start, stop), a streaming
        fragment) for round ``round_`` (weight: the samples behind it), trained under config
        version ``trained_under`` from global step ``first_step``; the answer carries the
        versions newer than ``known``.

        Raises:
            ConfigError: the round failed on bad input (a vector the group cannot use).
        """
        assert self.current.document is not None
        versions = self.current.versions()
        await versions.refresh(self.current.source)
        in_force = versions.in_force(first_step) or self.current.document
        self.state.round_started(round_)
        self.latest_round = max(self.latest_round, round_)
        started = trio.current_time()
        if trained_under != in_force.version:
            # Averaging would mix versions. A worker that missed a version is behind the peers
            # that trained under it, and catches up as a late peer does.
            log.info("round %d: the worker trained under config version %d, but version %d "
                     "is in force from global step %d: not averaged", round_, trained_under,
                     in_force.version, in_force.effective_step)
            result = not_averaged()
        else:
            start, stop = span if span is not None else (0, buffer.array.size)
            result = await self._average(buffer.array[start:stop], start, in_force, round_,
                                         weight, started)
        seconds = trio.current_time() - started
        result["round"] = round_
        result["round_seconds"] = seconds
        result["behind"] = in_force.version > trained_under
        await versions.refresh(self.current.source)
        result["run_configs"] = protocol.encode_run_configs(versions.newer_than(known))
        # The members' ids are for the status (the web UI lists them), not the worker.
        peers = result.pop("peers", [])
        self.last_round = {**result, "peers": peers, "finished_at": time.time()}
        self.telemetry.record("round_seconds", seconds)
        self.telemetry.record("fraction_averaged", result["fraction_averaged"])
        self.telemetry.record("round_peers", result["members"])
        self.state.round_ended()
        return result

    async def _average(self, vector: np.ndarray, offset: int, document: RunDocument,
                       round_: int, weight: float, started: float) -> dict[str, Any]:
        """Average ``vector`` (the shared buffer, or its fragment that starts at ``offset``: a
        view, averaged in place) with the round's group under config ``document``,
        waiting for a group as long as the last round had one (see ``MIN_PATIENCE``)."""
        averager = self._averager_for(document)
        patience = max(MIN_PATIENCE, 10 * document.config.averaging.gather_window)
        deadline = started + (patience if self.grouped_last else 0.0)
        while True:
            try:
                report = await averager.all_reduce(
                    vector,
                    max(weight, 1e-6),
                    round_,
                    error_feedback=self._error_feedback(averager, vector, offset),
                    # Nothing to add (a joiner): take the result without reducing a span.
                    reduces=weight > 0,
                )
            except NoGroup as exc:
                if exc.late:
                    # The others finished this round without us: we are behind. Reported as
                    # a group we could not average with, which sends the worker to catch up,
                    # and as left behind: the others hold a state this peer must wait for.
                    log.info("%s", exc)  # the message names the round
                    return {**not_averaged(members=1 + exc.late), "left_behind": True}
                if trio.current_time() < deadline and not await _went_on(averager, round_):
                    continue
                log.info("round %d: no group (%s); this peer goes on alone", round_, exc)
                self.grouped_last = False
                return not_averaged()
            except DandelionError as exc:
                # The network let us down (no DHT yet, say): the worker trains on alone
                # rather than crash, and tries again next round.
                log.warning("round %d could not run: %s", round_, exc)
                return not_averaged()
            except ValueError as exc:
                raise ConfigError(f"round {round_} failed: {exc}") from None
            self.grouped_last = True
            return {
                "averaged": report.fraction_averaged > 0,
                "fraction_averaged": report.fraction_averaged,
                "members": len(report.members),
                "complete": report.complete,
                "peers": sorted(PeerId(m).to_base58() for m in report.members),
            }

    async def leave(self) -> None:
        """This peer stops training (``training.stop``, or the daemon stops): tell the peers
        that expect it in the round under way and the next that it will not come, so that
        they stop waiting for it at once."""
        if self.averager is None or self.latest_round < 0:
            return
        rounds = (self.latest_round, self.latest_round + 1)
        log.info("announcing that this peer leaves rounds %d and %d", *rounds)
        with trio.move_on_after(LEAVING_TIMEOUT):
            await self.averager.announce_leaving(rounds)
        # Stopped: no channels kept, no reads of the run's proofs, until it trains again.
        self.averagers.retire(self.averager)

    def _averager_for(self, document: RunDocument) -> Averager:
        """The averager of the run under config version ``document``: the version is part of
        the group's identity, so peers on different versions never average together."""
        key = group_run_key(self.current.id, document.version, document.toml)
        if self.averager is None or self.averager_key != key:
            if self.averager is not None:
                self.averagers.retire(self.averager)
            a = document.config.averaging
            settings = AveragingSettings(
                codec=a.codec,
                mode=a.aggregation,
                chunk_timeout=a.chunk_timeout,
                matchmaking=MatchmakingSettings(
                    gather_window=a.gather_window,
                    settle=min(0.5, a.gather_window / 2),
                    min_group=a.min_group,
                    max_group=a.max_group,
                    max_weight=a.max_weight,
                    admitted=document.config.admission.admitted(),
                ),
            )
            self.averager = self.averagers.create(key, settings)
            self.averager_key = key
            self._feedback = {}
        return self.averager

    def _error_feedback(self, averager: Averager, vector: np.ndarray,
                        offset: int) -> BufferErrorFeedback | None:
        """One error feedback per run and vector (per fragment with streaming), kept across
        rounds: with a lossy codec, what compression drops from a round's pseudo-gradient is
        sent in that vector's later rounds. At most ``MAX_FRAGMENTS`` are kept: the fragments
        of a run's buffer never overlap."""
        if averager.settings.codec == "none":
            return None
        size = vector.size
        fb = self._feedback.get(offset)
        if fb is None or fb.size != size or fb.codec.name != averager.settings.codec:
            if fb is None and len(self._feedback) >= MAX_FRAGMENTS:
                self._feedback.clear()  # another buffer: the old fragments are gone
            fb = self._feedback[offset] = averager.error_feedback_for(size)
        return fb
