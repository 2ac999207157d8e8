"""The sync service: the daemon's side of training, composed of one owner per concern.

It knows the run (from ``run``/``run_config`` or ``run.join``), supervises the worker
(``python -m dandelion_p2p.worker``, ``supervisor``), gives it a shared buffer (``session``),
runs the swarm's averaging rounds on that buffer (``rounds``), fetches the swarm's state for
a worker that is behind (``catchup``, ``statesync``) and serves its own checkpoints to peers.
What it is doing is the ``TrainingState``'s to say (``state``); the control methods are in
``rpc``. This module wires them together and owns their nursery.

A worker that crashes or runs out of memory is reported in ``training.status`` and the log
and restarted; nothing it does can end the daemon.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.peer.id import ID

from dandelion_p2p.averaging.averager import Averager, AveragingSettings
from dandelion_p2p.context import DaemonContext
from dandelion_p2p.dataplane.service import DataPlane
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.reputation.book import SCORE_EVENT_OF, ScoreEvent
from dandelion_p2p.runconfig.admission import NOT_ADMITTED
from dandelion_p2p.sync import rpc
from dandelion_p2p.sync.catchup import CatchUp
from dandelion_p2p.sync.ports import PeerScores
from dandelion_p2p.sync.rounds import SERIES_HELP as ROUND_SERIES
from dandelion_p2p.sync.rounds import Rounds
from dandelion_p2p.sync.runsource import (
    ChainedSource,
    ControlMethodSource,
    CurrentRun,
    LocalFileSource,
    RunSource,
)
from dandelion_p2p.sync.session import WorkerSession
from dandelion_p2p.sync.state import TrainingState
from dandelion_p2p.sync.statesync import StateServer
from dandelion_p2p.sync.supervisor import WorkerSupervisor
from dandelion_p2p.wire import RejectCode
from dandelion_p2p.worker.shm import buffer_dir, remove_stale

log = logging.getLogger(__name__)

class SwarmAveragers:
    """Averagers over this node and its data plane (``rounds.Averagers``)."""

    def __init__(self, node: SwarmNode, dataplane: DataPlane) -> None:
        self.node = node
        self.dataplane = dataplane

    def create(self, run: bytes, settings: AveragingSettings) -> Averager:
        return Averager(
            signer=self.node.identity,
            records=self.node.records,
            links=self.node,
            reputation=self.node,
            dataplane=self.dataplane,
            background=self.node.background,
            run=run,
            settings=settings,
        )

    def retire(self, averager: Averager) -> None:
        averager.uninstall()


class SyncService:
    name = "training"

    def __init__(self, ctx: DaemonContext, source: RunSource | None = None) -> None:
        config = ctx.config
        self.ctx = ctx
        self.state = TrainingState(wanted=config.worker)
        self.current = CurrentRun(
            config.run,
            source or ChainedSource([ControlMethodSource(ctx.handlers),
                                     LocalFileSource(config.run_config)]),
            config.data_dir / "worker",
        )
        self.session = WorkerSession(buffer_dir(config.data_dir))
        self.supervisor = WorkerSupervisor(self.state, self.current, self.session, config,
                                           ctx.identity.peer_id_bytes)
        self.rounds = Rounds(self.state, self.current, SwarmAveragers(ctx.node, ctx.dataplane),
                             ctx.telemetry)
        self.progress = rpc.WorkerProgress()
        self.worker_methods = rpc.WorkerMethods(
            self.state, self.current, self.session, self.supervisor, self.rounds,
            CatchUp(ctx.node, wait_for_peers=config.catch_up_wait, admitted=self._admitted),
            self.progress, ctx.telemetry, ctx.identity.peer_id.to_base58(),
        )
        self.user_methods = rpc.UserMethods(self.state, self.current, self.supervisor,
                                            ctx.node, self.status,
                                            self.worker_methods.cancel_work,
                                            self.rounds.leave)
        self.scores: PeerScores = ctx.node
        self.state_server = StateServer(
            ctx.node.host, lambda: self.current.id, self.current.checkpoints,
            on_violation=self._violation, is_banned=self._refused,
        )
        # Registrations with the daemon's context only; the host is touched in run().
        for name, text in {**rpc.SERIES_HELP, **ROUND_SERIES}.items():
            ctx.telemetry.describe(name, text)
        ctx.add_handlers({**self.user_methods.handlers(), **self.worker_methods.handlers()})
        ctx.status_sections["training"] = self.status
        ctx.drains.append(self.drain)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state.phase.value,
            "run": self.current.id,
            "step": self.progress.step,
            "global_step": self.progress.global_step,
            "loss": self.progress.loss,
            "samples_per_second": self.progress.samples_per_second,
            "learning_rate": self.progress.learning_rate,
            "validation_loss": self.progress.validation_loss,
            "validation_step": self.progress.validation_step,
            "detail": self.state.detail,
            "last_round": self.rounds.last_round,
            "pid": self.session.pid,
            "crashes": self.state.crashes,
        }

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED  # type: ignore[name-defined]
    ) -> None:
        for stale in remove_stale(self.session.buffer_dir):
            log.info("removed the shared buffer %s of a daemon that is gone", stale)
        self.state_server.install()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await self.supervisor.run(nursery)
        finally:
            self.session.drop_buffer()

    async def drain(self) -> None:
        """Stop the worker while the control socket still serves: it needs the socket to end
        its step, write its stop checkpoint and report; its last output reaches the log."""
        self.state.drain(worker_running=self.supervisor.worker is not None)
        self.worker_methods.cancel_work()
        await self.supervisor.stop_and_wait()
        await self.rounds.leave()

    NO_RUN = "no run loaded here yet"

    def _refused(self, peer: ID) -> bool | str:
        """Peers the state server answers with FORBIDDEN unread: the banned, and in a closed
        run, those its config does not admit."""
        if self.scores.is_banned(peer):
            return True
        document = self.current.document
        if document is None:
            # No run loaded (none yet, or a join under way): whether it is closed is not
            # known, and nothing of it is here to serve.
            return self.NO_RUN
        return not document.config.admission.admits(peer.to_bytes()) and NOT_ADMITTED

    def _admitted(self) -> frozenset[bytes] | None:
        """The peers of the run trained here a catch-up may ask (None: anyone's)."""
        document = self.current.document
        if document is None:
            return frozenset()  # a join under way: nobody is asked for a run not loaded
        return document.config.admission.admitted()

    def _violation(self, peer: ID, code: RejectCode) -> None:
        log.info("state transfer: violation by %s: %s", peer, code.name)
        self.scores.record_score(peer.to_bytes(), SCORE_EVENT_OF.get(code, ScoreEvent.MALFORMED))


def create(ctx: DaemonContext) -> SyncService | None:
    """The sync service runs on every daemon: even one that does not train answers
    ``training.status`` (with the reason) and can be told to ``run.join`` later."""
    return SyncService(ctx)
