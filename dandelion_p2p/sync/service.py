"""The sync service: the daemon's side of training.

It knows the run (from ``run``/``run_config`` or ``run.join``), spawns and supervises the
worker (``python -m dandelion_p2p.worker``), gives it a shared buffer, and when the worker
asks runs the swarm's averaging round on that buffer. Control methods: ``training.status``,
``training.start``, ``training.stop``, ``run.join`` for users and other services;
``worker.hello``, ``worker.buffer``, ``worker.progress``, ``worker.sync`` for the worker
(``protocol/worker.md``).

A worker that crashes or runs out of memory is reported in ``training.status`` and the log
and restarted; nothing it does can end the daemon.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID

from dandelion_p2p.averaging.averager import Averager, AveragingSettings, NoGroup
from dandelion_p2p.averaging.compression import BufferErrorFeedback
from dandelion_p2p.averaging.matchmaking import MatchmakingSettings, group_run_key
from dandelion_p2p.context import DaemonContext
from dandelion_p2p.errors import ConfigError, DandelionError
from dandelion_p2p.net.node import SCORE_EVENT_OF
from dandelion_p2p.reputation.book import ScoreEvent
from dandelion_p2p.sync.runsource import (
    ChainedSource,
    ControlMethodSource,
    LocalFileSource,
    RunDocument,
    RunSource,
    RunVersions,
)
from dandelion_p2p.sync.shm import SharedVector, buffer_dir, remove_stale
from dandelion_p2p.sync.statesync import StateServer, StateUnavailable, fetch_state
from dandelion_p2p.sync.supervisor import MAX_BACKOFF, STABLE_AFTER, WorkerProcess, describe_exit
from dandelion_p2p.wire import RejectCode
from dandelion_p2p.worker import protocol

log = logging.getLogger(__name__)

TRAINING_DATA = "training-data"
CATCH_UP_TRIES = 10
CATCH_UP_PAUSE = 1.0
MIN_PATIENCE = 60.0
"""Seconds a peer waits at a sync point for the group it averaged with last time (a peer
whose worker restarts from its checkpoint comes back within this); a peer that found nobody
last time tries once per round."""

SERIES_HELP = {
    "loss": "training loss of this peer's last step",
    "samples_per_second": "samples this peer trains per second",
    "global_step": "the swarm's global optimizer step",
    "round_seconds": "seconds an averaging round took",
    "fraction_averaged": "fraction of the vector averaged with other peers in a round",
    "round_peers": "peers in the last averaging round",
}


def _need_str(params: dict[str, Any], key: str, limit: int = 256) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ConfigError(f"missing or bad {key!r}: a string of 1-{limit} characters")
    return value


def _need_number(params: dict[str, Any], key: str, low: float, high: float) -> float:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        low <= value <= high
    ) or not math.isfinite(value):
        raise ConfigError(f"missing or bad {key!r}: a number in [{low}, {high}]")
    return float(value)


class SyncService:
    name = "training"

    def __init__(self, ctx: DaemonContext, source: RunSource | None = None) -> None:
        self.ctx = ctx
        self.source = source or ChainedSource(
            [ControlMethodSource(ctx.handlers), LocalFileSource(ctx.config.run_config)]
        )
        self.run_id = ctx.config.run
        self.document: RunDocument | None = None
        self.versions: RunVersions | None = None
        """Every version of the run's config seen, to tell which is in force for a round."""
        self.state = "idle"
        self.detail = ""
        self.pid: int | None = None
        self.step = 0
        self.global_step = 0
        self.loss: float | None = None
        self.samples_per_second: float | None = None
        self.last_round: dict[str, Any] | None = None
        self.session: str | None = None
        self.buffer: SharedVector | None = None
        self.averager: Averager | None = None
        self._feedback: BufferErrorFeedback | None = None
        self.averager_key = b""
        self.grouped_last = True
        self.crashes = 0
        self.stop_asked = False
        self.switching_run = False
        self.wanted = ctx.config.worker
        self._changed = trio.Event()
        self._worker: WorkerProcess | None = None
        self._nursery: trio.Nursery | None = None
        for name, text in SERIES_HELP.items():
            ctx.telemetry.describe(name, text)
        ctx.add_handlers({
            "training.status": self.h_status,
            "training.start": self.h_start,
            "training.stop": self.h_stop,
            "run.join": self.h_join,
            protocol.HELLO: self.h_hello,
            protocol.BUFFER: self.h_buffer,
            protocol.PROGRESS: self.h_progress,
            protocol.SYNC: self.h_sync,
            protocol.CATCH_UP: self.h_catch_up,
        })
        self.checkpoint_dir: Path | None = None
        self.state_server = StateServer(
            ctx.node.host, lambda: self.run_id, self._checkpoints,
            on_violation=self._violation,
            is_banned=lambda peer: ctx.node.scores.is_banned(peer.to_bytes(), time.time()),
        )
        self.state_server.install()
        for stale in remove_stale(buffer_dir(ctx.config.data_dir)):
            log.info("removed the shared buffer %s of a daemon that is gone", stale)
        ctx.status_sections["training"] = self.status
        self.draining = False
        self._rounds: set[trio.CancelScope] = set()
        self._worker_gone = trio.Event()
        ctx.drains.append(self.drain)

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "run": self.run_id,
            "step": self.step,
            "global_step": self.global_step,
            "loss": self.loss,
            "samples_per_second": self.samples_per_second,
            "detail": self.detail,
            "last_round": self.last_round,
            "pid": self.pid,
            "crashes": self.crashes,
        }

    def _set(self, state: str, detail: str | None = None) -> None:
        self.state = state
        if detail is not None:
            self.detail = detail[: protocol.MAX_DETAIL]

    # ------------------------------------------------------------------ supervision

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED  # type: ignore[name-defined]
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._supervise()
        finally:
            self._drop_buffer()

    async def _supervise(self) -> None:
        backoff = 1.0
        while True:
            self._changed = trio.Event()
            if not self.wanted:
                if self.state not in ("stopped", "crashed"):
                    self._set("stopped" if self.stop_asked else "idle")
                await self._changed.wait()
                continue
            problem = await self._prepare()
            if problem is not None:
                log.info("not training: %s", problem)
                self._set("idle" if self.state != "unavailable" else "unavailable", problem)
                self.wanted = False
                continue
            if not self.wanted:
                continue  # stopped (or the daemon began to stop) while the run was fetched
            started = time.monotonic()
            self._set("starting", "starting the worker")
            self._worker_gone = trio.Event()
            self._worker = WorkerProcess(self._argv(), env=dict(os.environ))
            code = await self._worker.run(on_started=self._on_started)
            outcome = describe_exit(code, list(self._worker.tail))
            self.pid = None
            self._worker = None
            self._worker_gone.set()
            self.session = None
            self._drop_buffer()
            if self.switching_run:
                self.switching_run = False
                continue
            if self.stop_asked:
                self._set("stopped", "stopped on request")
                self.wanted = False
                continue
            if code == 0:
                self._set("stopped", outcome.detail)
                self.wanted = False
                continue
            self.crashes += 1
            log.error("training worker: %s", outcome.detail)
            self._set("crashed", outcome.detail)
            if not outcome.restart:
                self.wanted = False
                continue
            if time.monotonic() - started > STABLE_AFTER:
                backoff = 1.0
            self.detail += f"; restarting in {backoff:g} s"
            with trio.move_on_after(backoff):
                await self._changed.wait()
            backoff = min(MAX_BACKOFF, backoff * 2)

    def _on_started(self, pid: int) -> None:
        self.pid = pid
        log.info("training worker started (pid %d) for run %s", pid, self.run_id)

    async def _prepare(self) -> str | None:
        """Check that the worker can start; a reason it cannot, or None."""
        if importlib.util.find_spec("torch") is None:
            self.state = "unavailable"
            return ("torch is not installed here: install dandelion-p2p[train] to train "
                    "(this node still relays, stores and averages for the swarm)")
        try:
            document = await self.source.fetch(self.run_id)
        except ConfigError as exc:
            return f"run config: {exc}"
        if document is None:
            return ("no run to train: start the daemon with --run RUN (`dandelion-p2p runs` "
                    "lists them) or --run-config, or join one from the web UI")
        self.document = document
        self.run_id = document.run
        configured = self.ctx.config.train_data
        if configured is not None and not Path(configured).is_dir():
            return f"train_data {configured} is not a folder"
        return None

    def data_folder(self) -> Path | None:
        """The local images the worker trains on: ``train_data`` when configured, else
        ``DATA_DIR/training-data`` if it exists; None: chunks leased from the run's dataset
        servers."""
        configured = self.ctx.config.train_data
        if configured is not None:
            return Path(configured)
        default = self.ctx.config.data_dir / TRAINING_DATA
        return default if default.is_dir() else None

    def _argv(self) -> list[str]:
        config = self.ctx.config
        folder = self.data_folder()
        return [
            sys.executable, "-m", "dandelion_p2p.worker",
            "--socket", str(config.control_socket_path),
            "--data-dir", str(config.data_dir),
            *(["--data", str(folder)] if folder is not None else []),
            "--log-level", config.log_level,
        ]

    def _drop_buffer(self) -> None:
        if self.buffer is not None:
            self.buffer.unlink()
            self.buffer = None

    # ------------------------------------------------------------------ user methods

    async def h_status(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def h_start(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.draining:
            raise ConfigError("the daemon is stopping")
        self.wanted, self.stop_asked = True, False
        self._changed.set()
        return self.status()

    async def h_stop(self, params: dict[str, Any]) -> dict[str, Any]:
        self.wanted, self.stop_asked = False, True
        if self._worker is not None:
            self._set("stopping", "stopping after the current step")
            self._stop_worker()
        else:
            self._set("stopped", "stopped on request")
        self._changed.set()
        return self.status()

    def _stop_worker(self) -> None:
        """Ask the worker to stop (it finishes its step and writes a checkpoint) without
        holding up the caller; the supervisor sees it exit."""
        if self._worker is not None and self._nursery is not None:
            self._nursery.start_soon(self._worker.stop)

    async def h_join(self, params: dict[str, Any]) -> dict[str, Any]:
        run = _need_str(params, "run", 128)
        # The run must exist before anything stops: a mistyped id leaves training as it was.
        document = await self.source.fetch(run)
        if document is None:
            raise ConfigError(f"run {run!r} not found: no published or local config names it")
        self.run_id = run
        self.document = None
        if self._worker is not None:
            # The worker saves its checkpoint and exits; the supervisor starts one for `run`.
            self.switching_run = True
            self._stop_worker()
        self.wanted, self.stop_asked = True, False
        self._changed.set()
        return self.status()

    # ------------------------------------------------------------------ worker methods

    def _check_session(self, params: dict[str, Any]) -> None:
        if params.get("session") != self.session or self.session is None:
            raise ConfigError("unknown worker session: another worker took over, say hello")

    async def h_hello(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("protocol") != protocol.PROTOCOL_VERSION:
            raise ConfigError(
                f"worker protocol {params.get('protocol')!r}; this daemon speaks "
                f"{protocol.PROTOCOL_VERSION}"
            )
        if self.document is None:
            document = await self.source.fetch(self.run_id)
            if document is None:
                raise ConfigError("this daemon has no run to train: use run.join")
            self.document, self.run_id = document, document.run
        pid = params.get("pid")
        if self._worker is not None and pid != self._worker.pid:
            raise ConfigError(
                f"this daemon runs its own worker (pid {self._worker.pid}); start the daemon "
                "with --no-worker to run a worker by hand"
            )
        self._drop_buffer()
        self.session = secrets.token_hex(16)
        if isinstance(pid, int) and self._worker is None:
            self.pid = pid  # a worker started by hand, not by us
        self._set("starting", "the worker is loading the model and data")
        versions = self._run_versions()
        await versions.refresh(self.source)
        newest = versions.newest() or self.document
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "session": self.session,
            "run": self.run_id,
            "run_config": newest.toml,
            "run_configs": protocol.encode_run_configs(versions.timeline),
            "peer": self.ctx.identity.peer_id.to_base58(),
        }

    async def h_buffer(self, params: dict[str, Any]) -> dict[str, Any]:
        self._check_session(params)
        elements = int(_need_number(params, "elements", 1, protocol.MAX_ELEMENTS))
        self._drop_buffer()
        self.buffer = SharedVector.create_in(buffer_dir(self.ctx.config.data_dir), elements)
        return {"path": str(self.buffer.path)}

    async def h_progress(self, params: dict[str, Any]) -> dict[str, Any]:
        self._check_session(params)
        state = params.get("state")
        if state in protocol.WORKER_STATES and (self.state != "stopping" or state == "stopped"):
            detail = params.get("detail")
            self._set(str(state), detail if isinstance(detail, str) else None)
        telemetry = self.ctx.telemetry
        for key in ("step", "global_step"):
            value = params.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                setattr(self, key, value)
        telemetry.record("global_step", self.global_step)
        for key in ("loss", "samples_per_second"):
            value = params.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
                value
            ):
                setattr(self, key, float(value))
                telemetry.record(key, float(value))
        return {"stop": self.stop_asked}

    def _violation(self, peer: ID, code: RejectCode) -> None:
        log.info("state transfer: violation by %s: %s", peer, code.name)
        self.ctx.node.record_score(peer.to_bytes(), SCORE_EVENT_OF.get(code, ScoreEvent.MALFORMED))

    def _checkpoints(self) -> Path | None:
        """Where this peer's worker keeps its checkpoints (served to joining peers)."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        if self.document is None:
            return None
        return self.ctx.config.data_dir / "worker" / self.document.config.name / "checkpoints"

    async def h_catch_up(self, params: dict[str, Any]) -> dict[str, Any]:
        """Download the swarm's state into the worker's checkpoint folder when peers are
        ahead of ``step``; answers the step now there (-1: nothing newer found). Cut short,
        like a round, when the daemon stops."""
        self._check_session(params)
        answer = await self._unless_stopping(lambda: self._catch_up(params))
        return answer if answer is not None else {"step": -1, "detail": "the daemon is stopping"}

    async def _catch_up(self, params: dict[str, Any]) -> dict[str, Any]:
        have = int(_need_number(params, "step", -1, 2**53))
        folder = Path(_need_str(params, "checkpoints", 4096))
        if not folder.is_absolute():
            raise ConfigError("'checkpoints' must be an absolute path")
        self.checkpoint_dir = folder
        self._set("starting", "looking for the swarm's current state")
        wait = params.get("wait") is True
        for attempt in range(CATCH_UP_TRIES):
            peers = await self._training_peers()
            if not peers:
                if not wait or attempt + 1 == CATCH_UP_TRIES:
                    return {"step": -1, "detail": "no peers to ask"}
                # Just started: the bootstrap connection or member records may not be up yet.
                await trio.sleep(CATCH_UP_PAUSE)
                continue
            try:
                step, sources = await fetch_state(
                    self.ctx.node.host, peers, self.run_id, have, folder,
                    connect=self.ctx.node.connect_peer,
                )
                break
            except StateUnavailable as exc:
                log.info("state transfer: %s", exc)
                if not exc.retry or attempt + 1 == CATCH_UP_TRIES:
                    return {"step": -1, "detail": str(exc)}
        else:
            return {"step": -1, "detail": "no peers to ask"}
        return {"step": step, "peers": sources}

    async def _training_peers(self) -> list[ID]:
        """Peers that may hold the run's state: the swarm's members and whoever we are
        connected to (a member record may not have spread yet)."""
        me = self.ctx.identity.peer_id
        found = set(self.ctx.node.host.get_network().get_connections_map())
        try:
            found.update(ID.from_base58(peer) for peer in await self.ctx.node.members())
        except DandelionError as exc:
            log.info("cannot list the swarm's members: %s", exc)
        return [peer for peer in found if peer != me]

    def _run_versions(self) -> RunVersions:
        """The versions known of the run being trained, ``self.document`` among them."""
        assert self.document is not None
        if self.versions is None or self.versions.run != self.run_id:
            self.versions = RunVersions(self.run_id)
        self.versions.offer(self.document)
        return self.versions

    def _averager_for(self, document: RunDocument) -> Averager:
        """The averager of the run under config version ``document``: the version is part of
        the group's identity, so peers on different versions never average together."""
        key = group_run_key(self.run_id, document.version, document.toml)
        if self.averager is None or self.averager_key != key:
            if self.averager is not None:
                self.ctx.dataplane.unregister("averaging/1")
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
                ),
            )
            self.averager = Averager(self.ctx.node, self.ctx.dataplane, run=key,
                                     settings=settings)
            self.averager_key = key
            self._feedback = None
        return self.averager

    def _error_feedback(self, averager: Averager) -> BufferErrorFeedback | None:
        """One error feedback per run and vector, kept across rounds: with a lossy codec,
        what compression drops from a round's pseudo-gradient is sent in later rounds."""
        assert self.buffer is not None
        if averager.settings.codec == "none":
            return None
        size = self.buffer.array.size
        fb = self._feedback
        if fb is None or fb.size != size or fb.codec.name != averager.settings.codec:
            fb = self._feedback = averager.error_feedback_for(size)
        return fb

    async def h_sync(self, params: dict[str, Any]) -> dict[str, Any]:
        """A round, cut short (averaged with nobody) when the daemon stops: the worker then
        ends its step and writes its stop checkpoint instead of waiting out the round."""
        self._check_session(params)
        answer = await self._unless_stopping(lambda: self._sync_round(params))
        if answer is not None:
            return answer
        return {**_not_averaged(), "round": params.get("round"), "round_seconds": 0.0,
                "stopping": True}

    async def _unless_stopping(
        self, work: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any] | None:
        """``work()``'s answer, or None when the daemon is stopping, before or while it runs
        (``drain`` cancels it)."""
        if self.draining:
            return None
        scope = trio.CancelScope()
        self._rounds.add(scope)
        try:
            with scope:
                return await work()
        finally:
            self._rounds.discard(scope)
        return None

    async def drain(self) -> None:
        """Stop the worker while the control socket still serves: it needs the socket to end
        its step, write its stop checkpoint and report; its last output reaches the log."""
        self.draining = True
        self.wanted, self.stop_asked = False, True
        for scope in list(self._rounds):
            scope.cancel()
        worker = self._worker
        if worker is None:
            return
        self._set("stopping", "the daemon is stopping: the worker ends its step")
        try:
            await worker.stop()
            await self._worker_gone.wait()
        except trio.Cancelled:
            # Cut short (a second signal, or the drain's time limit): no more grace.
            worker.kill()
            raise

    async def _sync_round(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.buffer is None or self.document is None:
            raise ConfigError("no shared buffer: call worker.buffer first")
        round_ = int(_need_number(params, "round", 0, 2**53))
        weight = _need_number(params, "weight", 0, 1e12)
        trained_under, first_step, known = protocol.round_config(params)
        versions = self._run_versions()
        await versions.refresh(self.source)
        in_force = versions.in_force(first_step) or self.document
        self._set("syncing", f"averaging round {round_}")
        started = trio.current_time()
        if trained_under != in_force.version:
            # Averaging would mix versions. A worker that missed a version is behind the peers
            # that trained under it, and catches up as a late peer does.
            log.info("round %d: the worker trained under config version %d, but version %d "
                     "is in force from global step %d: not averaged", round_, trained_under,
                     in_force.version, in_force.effective_step)
            result = _not_averaged()
        else:
            result = await self._average(in_force, round_, weight, started)
        seconds = trio.current_time() - started
        result["round"] = round_
        result["round_seconds"] = seconds
        result["behind"] = in_force.version > trained_under
        await versions.refresh(self.source)
        result["run_configs"] = protocol.encode_run_configs(versions.newer_than(known))
        self.last_round = {**result, "finished_at": time.time()}
        telemetry = self.ctx.telemetry
        telemetry.record("round_seconds", seconds)
        telemetry.record("fraction_averaged", result["fraction_averaged"])
        telemetry.record("round_peers", result["members"])
        self._set("training", None)
        return result


    async def _average(self, document: RunDocument, round_: int, weight: float,
                       started: float) -> dict[str, Any]:
        """Average the shared buffer with the round's group under config ``document``,
        waiting for a group as long as the last round had one (see ``MIN_PATIENCE``)."""
        assert self.buffer is not None
        averager = self._averager_for(document)
        patience = max(MIN_PATIENCE, 10 * document.config.averaging.gather_window)
        deadline = started + (patience if self.grouped_last else 0.0)
        while True:
            try:
                report = await averager.all_reduce(
                    self.buffer.array,
                    max(weight, 1e-6),
                    round_,
                    error_feedback=self._error_feedback(averager),
                )
            except NoGroup as exc:
                if exc.late:
                    # The others finished this round without us: we are behind. Reported as
                    # a group we could not average with, which sends the worker to catch up.
                    log.info("%s", exc)  # the message names the round
                    return _not_averaged(members=1 + exc.late)
                if trio.current_time() < deadline:
                    continue
                log.info("round %d: no group (%s); this peer goes on alone", round_, exc)
                self.grouped_last = False
                return _not_averaged()
            except DandelionError as exc:
                # The network let us down (no DHT yet, say): the worker trains on alone
                # rather than crash, and tries again next round.
                log.warning("round %d could not run: %s", round_, exc)
                return _not_averaged()
            except ValueError as exc:
                raise ConfigError(f"round {round_} failed: {exc}") from None
            self.grouped_last = True
            return {
                "averaged": report.fraction_averaged > 0,
                "fraction_averaged": report.fraction_averaged,
                "members": len(report.members),
                "complete": report.complete,
            }


def _not_averaged(members: int = 1) -> dict[str, Any]:
    """A round's answer when nothing was averaged: the buffer holds the worker's own values."""
    return {"averaged": False, "fraction_averaged": 0.0, "members": members,
            "complete": False}


def create(ctx: DaemonContext) -> SyncService | None:
    """The sync service runs on every daemon: even one that does not train answers
    ``training.status`` (with the reason) and can be told to ``run.join`` later."""
    return SyncService(ctx)
