"""The training service's control methods.

For users and other services: ``training.status``, ``training.start``, ``training.stop``,
``training.swarm_step`` and ``run.join``. For the worker (``protocol/worker.md``):
``worker.hello``, ``worker.buffer``, ``worker.progress``, ``worker.sync`` and
``worker.catch_up``. Each checks its parameters and hands the request to the owner of that
concern: the ``TrainingState``, the supervisor, the session, the rounds, the catch-up.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from dandelion_p2p.context import Handler
from dandelion_p2p.errors import ConfigError
from dandelion_p2p.identity import PeerId
from dandelion_p2p.runconfig.admission import MAX_ADMITTED, admitted_ids
from dandelion_p2p.sync.catchup import CatchUp
from dandelion_p2p.sync.partial_state import leave_out_names
from dandelion_p2p.sync.ports import StatePeers
from dandelion_p2p.sync.progress import swarm_checkpoint_step
from dandelion_p2p.sync.rounds import Rounds, not_averaged
from dandelion_p2p.sync.runsource import CurrentRun
from dandelion_p2p.sync.session import WorkerSession
from dandelion_p2p.sync.state import TrainingState
from dandelion_p2p.sync.supervisor import WorkerSupervisor
from dandelion_p2p.telemetry import Telemetry
from dandelion_p2p.worker import protocol

SERIES_HELP = {
    "loss": "training loss of this peer's last step",
    "samples_per_second": "samples this peer trains per second",
    "global_step": "the swarm's global optimizer step",
    "learning_rate": "learning rate of this peer's last step (the first parameter group)",
    "validation_loss": "loss on the run's held-out images, fixed noise and timesteps",
}


def need_str(params: dict[str, Any], key: str, limit: int = 256) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ConfigError(f"missing or bad {key!r}: a string of 1-{limit} characters")
    return value


def need_number(params: dict[str, Any], key: str, low: float, high: float) -> float:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        low <= value <= high
    ) or not math.isfinite(value):
        raise ConfigError(f"missing or bad {key!r}: a number in [{low}, {high}]")
    return float(value)


@dataclass
class WorkerProgress:
    """What the worker last reported of its training."""

    step: int = 0
    global_step: int = 0
    loss: float | None = None
    samples_per_second: float | None = None
    learning_rate: float | None = None
    validation_loss: float | None = None
    validation_step: int | None = None

    def update(self, params: dict[str, Any], telemetry: Telemetry) -> None:
        """Take the well-formed fields of a ``worker.progress`` report; others are ignored."""
        for key in ("step", "global_step"):
            count = _count(params.get(key))
            if count is not None:
                setattr(self, key, count)
        telemetry.record("global_step", self.global_step)
        for key, series in (("loss", "loss"), ("samples_per_second", "samples_per_second"),
                            ("lr", "learning_rate")):
            value = _finite(params.get(key))
            if value is not None:
                setattr(self, series, value)
                telemetry.record(series, value)
        # Reported with every progress report until the next one: charted once per step.
        val_step, val_loss = _count(params.get("validation_step")), _finite(
            params.get("validation_loss"))
        if val_step is not None and val_loss is not None and val_step != self.validation_step:
            self.validation_step, self.validation_loss = val_step, val_loss
            telemetry.record("validation_loss", val_loss)


def _count(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**53
    return value if ok else None


def _finite(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


MAX_SAMPLES_LISTED = 12


class UserMethods:
    def __init__(self, state: TrainingState, current: CurrentRun,
                 supervisor: WorkerSupervisor, peers: StatePeers,
                 status: Callable[[], dict[str, Any]],
                 cut_worker_calls: Callable[[], None],
                 leave_rounds: Callable[[], Awaitable[None]]) -> None:
        """``cut_worker_calls``: ends the worker's round or catch-up under way, so that a
        worker told to stop is not held up waiting for a group that may never form;
        ``leave_rounds``: tells the peers that this one will not come to the rounds they
        expect it in (``Rounds.leave``)."""
        self.state = state
        self.current = current
        self.supervisor = supervisor
        self.peers = peers
        self.status = status
        self.cut_worker_calls = cut_worker_calls
        self.leave_rounds = leave_rounds

    def handlers(self) -> dict[str, Handler]:
        return {
            "training.status": self.h_status,
            "training.start": self.h_start,
            "training.stop": self.h_stop,
            "training.swarm_step": self.h_swarm_step,
            "training.samples": self.h_samples,
            "run.join": self.h_join,
        }

    async def h_samples(self, params: dict[str, Any]) -> dict[str, Any]:
        """The newest sample images the worker drew (at most ``MAX_SAMPLES_LISTED``) and the
        folder they are in ("" before the run's worker folder is known)."""
        checkpoints = self.current.checkpoints()
        if checkpoints is None:
            return {"folder": "", "samples": []}
        folder = checkpoints.parent / protocol.SAMPLES_DIR
        samples = await trio.to_thread.run_sync(
            protocol.sample_files, folder, MAX_SAMPLES_LISTED)
        return {"folder": str(folder), "samples": samples}

    async def h_status(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def h_start(self, params: dict[str, Any]) -> dict[str, Any]:
        self.state.start()
        self.supervisor.poke()
        return self.status()

    async def h_stop(self, params: dict[str, Any]) -> dict[str, Any]:
        running = self.supervisor.worker is not None
        self.state.stop(worker_running=running)
        self.supervisor.poke()
        if running:
            self._stop_worker()
            await self.leave_rounds()
        return self.status()

    async def h_join(self, params: dict[str, Any]) -> dict[str, Any]:
        run = need_str(params, "run", 128)
        # The run must exist before anything stops: a mistyped id leaves training as it was.
        if await self.current.source.fetch(run) is None:
            raise ConfigError(f"run {run!r} not found: no published or local config names it")
        self.current.switch(run)
        running = self.supervisor.worker is not None
        if running:
            # The worker saves its checkpoint and exits; the supervisor starts one for `run`.
            self._stop_worker()
        self.state.join(replacing_worker=running)
        self.supervisor.poke()
        if running:
            # Still the old run's averager: the new worker's first round makes the new one.
            await self.leave_rounds()
        return self.status()

    def _stop_worker(self) -> None:
        """The running worker ends its step and exits, not held up by a round or catch-up
        it waits in."""
        self.cut_worker_calls()
        self.supervisor.stop_worker()

    async def h_swarm_step(self, params: dict[str, Any]) -> dict[str, Any]:
        """The swarm's checkpoint step of ``run`` (-1: no peer answered), for the run
        publisher choosing where a new config version applies."""
        run = need_str(params, "run", 128)
        admitted = params.get("admitted")
        if admitted is not None and (
            not isinstance(admitted, list) or len(admitted) > MAX_ADMITTED
            or not all(isinstance(p, str) for p in admitted)
        ):
            raise ConfigError(f"'admitted' must be a list of at most {MAX_ADMITTED} peer ids")
        try:
            closed = None if admitted is None else admitted_ids(tuple(admitted))
        except ValueError as exc:
            raise ConfigError(f"'admitted': {exc}") from None
        return {"step": await swarm_checkpoint_step(self.peers, run, admitted=closed)}


class WorkerMethods:
    def __init__(self, state: TrainingState, current: CurrentRun, session: WorkerSession,
                 supervisor: WorkerSupervisor, rounds: Rounds, catch_up: CatchUp,
                 progress: WorkerProgress, telemetry: Telemetry, peer_id: str) -> None:
        self.state = state
        self.current = current
        self.session = session
        self.supervisor = supervisor
        self.rounds = rounds
        self.catch_up = catch_up
        self.progress = progress
        self.telemetry = telemetry
        self.peer_id = peer_id
        self._work: set[trio.CancelScope] = set()

    def handlers(self) -> dict[str, Handler]:
        return {
            protocol.HELLO: self.h_hello,
            protocol.BUFFER: self.h_buffer,
            protocol.PROGRESS: self.h_progress,
            protocol.SYNC: self.h_sync,
            protocol.CATCH_UP: self.h_catch_up,
            protocol.CATCH_UP_STATUS: self.h_catch_up_status,
            protocol.FETCH_ROUNDS: self.h_fetch_rounds,
        }

    def cancel_work(self) -> None:
        """Cut short the rounds and catch-ups under way (the worker is being stopped)."""
        for scope in list(self._work):
            scope.cancel()

    async def h_hello(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("protocol") != protocol.PROTOCOL_VERSION:
            raise ConfigError(
                f"worker protocol {params.get('protocol')!r}; this daemon speaks "
                f"{protocol.PROTOCOL_VERSION}"
            )
        if self.current.document is None and await self.current.load() is None:
            raise ConfigError("this daemon has no run to train: use run.join")
        refused = self.current.not_admitting(PeerId.from_base58(self.peer_id))
        if refused is not None:
            raise ConfigError(refused)
        pid = params.get("pid")
        worker = self.supervisor.worker
        if worker is not None and pid != worker.pid:
            raise ConfigError(
                f"this daemon runs its own worker (pid {worker.pid}); start the daemon "
                "with --no-worker to run a worker by hand"
            )
        session = self.session.open()
        if isinstance(pid, int) and worker is None:
            self.session.pid = pid  # a worker started by hand, not by us
        self.state.hello()
        versions = self.current.versions()
        await versions.refresh(self.current.source)
        assert self.current.document is not None
        newest = versions.newest() or self.current.document
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "session": session,
            "run": self.current.id,
            "run_config": newest.toml,
            "run_configs": protocol.encode_run_configs(versions.timeline),
            "peer": self.peer_id,
        }

    async def h_buffer(self, params: dict[str, Any]) -> dict[str, Any]:
        self.session.check(params)
        elements = int(need_number(params, "elements", 1, protocol.MAX_ELEMENTS))
        return {"path": str(self.session.new_buffer(elements).path)}

    async def h_progress(self, params: dict[str, Any]) -> dict[str, Any]:
        self.session.check(params)
        self.state.reported(params.get("state"), params.get("detail"))
        self.progress.update(params, self.telemetry)
        return {"stop": self.state.stop_asked}

    async def h_sync(self, params: dict[str, Any]) -> dict[str, Any]:
        """A round, cut short (averaged with nobody) when the worker is stopped: it then
        ends its step and writes its stop checkpoint instead of waiting out the round."""
        self.session.check(params)
        answer = await self._unless_stopping(lambda: self._sync(params))
        if answer is not None:
            return answer
        return {**not_averaged(), "round": params.get("round"), "round_seconds": 0.0,
                "stopping": True}

    async def _sync(self, params: dict[str, Any]) -> dict[str, Any]:
        buffer = self.session.buffer
        if buffer is None or self.current.document is None:
            raise ConfigError("no shared buffer: call worker.buffer first")
        round_ = int(need_number(params, "round", 0, 2**53))
        weight = need_number(params, "weight", 0, 1e12)
        trained_under, first_step, known = protocol.round_config(params)
        span = protocol.sync_span(params, buffer.array.size)
        return await self.rounds.sync(buffer, round_, weight, trained_under, first_step, known,
                                      span=span)

    async def h_catch_up(self, params: dict[str, Any]) -> dict[str, Any]:
        """Download the swarm's state into the worker's checkpoint folder when peers are
        ahead of ``step``; answers the step now there (-1: nothing newer found). Cut short,
        like a round, when the worker is stopped."""
        self.session.check(params)
        answer = await self._unless_stopping(lambda: self._catch_up(params))
        return answer if answer is not None else {"step": -1, "detail": "the daemon is stopping"}

    async def h_catch_up_status(self, params: dict[str, Any]) -> dict[str, Any]:
        """How far the ``worker.catch_up`` under way is: the step it downloads (-1: none
        chosen yet), its bytes done and in all."""
        self.session.check(params)
        return self.catch_up.status()

    async def _catch_up(self, params: dict[str, Any]) -> dict[str, Any]:
        have = int(need_number(params, "step", -1, 2**53))
        folder = Path(need_str(params, "checkpoints", 4096))
        if not folder.is_absolute():
            raise ConfigError("'checkpoints' must be an absolute path")
        try:
            leave_out = leave_out_names(params.get("leave_out"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.current.checkpoint_dir = folder
        self.state.catching_up()
        return await self.catch_up.run(self.current.id, have, folder,
                                       wait=params.get("wait") is True, leave_out=leave_out)

    async def h_fetch_rounds(self, params: dict[str, Any]) -> dict[str, Any]:
        """Download the averaged rounds that peers keep after ``round`` into ``folder``, none
        larger than ``max_size`` bytes (the worker replays them onto the state it loaded).
        Cut short when the worker is stopped."""
        self.session.check(params)
        after = int(need_number(params, "round", -1, 2**53))
        max_size = int(need_number(params, "max_size", 1, 2**40))
        folder = Path(need_str(params, "folder", 4096))
        if not folder.is_absolute():
            raise ConfigError("'folder' must be an absolute path")
        answer = await self._unless_stopping(
            lambda: self.catch_up.rounds(self.current.id, after, folder, max_size))
        return answer if answer is not None else {"rounds": [], "newest": after,
                                                  "detail": "the daemon is stopping"}

    async def _unless_stopping(
        self, work: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any] | None:
        """``work()``'s answer, or None when the worker is being stopped (``training.stop``,
        the daemon stopping), before or while it runs (``cancel_work`` cuts it short)."""
        if self.state.draining or self.state.stop_asked:
            return None
        scope = trio.CancelScope()
        self._work.add(scope)
        try:
            with scope:
                return await work()
        finally:
            self._work.discard(scope)
        return None
