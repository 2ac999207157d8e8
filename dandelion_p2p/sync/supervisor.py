"""Runs the worker process, restarts it when it crashes, and says why it stopped.

The worker is a child process: whatever happens in it (a Python exception, CUDA out of
memory, the kernel's OOM killer) ends that process only. Its output is copied line by line
into the daemon's log. After a crash it is restarted with a growing delay, except after a
configuration error (exit code 2), which a restart would only repeat. Whether a worker is
wanted, and what its exit means, is the ``TrainingState``'s to say; this module does the
processes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from dandelion_p2p.config import DaemonConfig
from dandelion_p2p.errors import ConfigError
from dandelion_p2p.sync.runsource import CurrentRun
from dandelion_p2p.sync.session import WorkerSession
from dandelion_p2p.sync.state import AfterExit, TrainingState

log = logging.getLogger(__name__)
worker_log = logging.getLogger("dandelion_p2p.worker.process")

EXIT_CONFIG = 2
EXIT_OOM = 3
STOP_GRACE = 30.0
"""Seconds a worker gets after SIGTERM to finish its step and write a checkpoint."""
MAX_BACKOFF = 60.0
STABLE_AFTER = 120.0
"""A worker that ran this long before crashing restarts at the shortest delay again."""
TRAINING_DATA = "training-data"
NO_TORCH = ("torch is not installed here: install dandelion-p2p[train] to train "
            "(this node still relays, stores and averages for the swarm)")


@dataclass(frozen=True)
class Exit:
    code: int
    detail: str
    restart: bool


def describe_exit(code: int, tail: Sequence[str]) -> Exit:
    """What a worker's exit code (negative: killed by that signal) means for the user."""
    last = next((line for line in reversed(tail) if "ERROR" in line or "Error" in line), "")
    if code == 0:
        return Exit(code, "the worker finished", False)
    if code == EXIT_CONFIG:
        return Exit(code, f"configuration problem: {last or 'see the log'}", False)
    if code == EXIT_OOM:
        return Exit(code, f"out of memory: {last}", True)
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else -code
        hint = " (possibly the out-of-memory killer)" if code == -signal.SIGKILL else ""
        return Exit(code, f"the worker was killed by {name}{hint}", True)
    return Exit(code, f"the worker crashed with exit code {code}: {last or 'see the log'}",
                True)


class WorkerProcess:
    """One run of the worker: start it, copy its output, wait for it, stop it."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.env = env
        self.process: trio.Process | None = None
        self.tail: deque[str] = deque(maxlen=40)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def run(self, on_started: Callable[[int], None]) -> int:
        """Run until the process exits; returns its exit code. Cancellation stops it
        (SIGTERM, then SIGKILL after ``STOP_GRACE``)."""
        self.process = await trio.lowlevel.open_process(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,
        )
        on_started(self.process.pid)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._copy_output)
                code = await self.process.wait()
            return code
        finally:
            with trio.CancelScope(shield=True):
                await self.stop()

    async def stop(self, grace: float = STOP_GRACE) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await process.wait()
            return
        log.warning("worker %d ignored SIGTERM for %g s; killing it", process.pid, grace)
        process.kill()
        await process.wait()

    def kill(self) -> None:
        """SIGKILL now, without waiting: for a stop that must not wait out the grace."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    async def _copy_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        pending = b""
        async for data in self.process.stdout:
            pending += data
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    self.tail.append(line)
                    worker_log.info("%s", line[:2000])


def data_folder(config: DaemonConfig) -> Path | None:
    """The local images the worker trains on: ``train_data`` when configured, else
    ``DATA_DIR/training-data`` if it exists; None: chunks leased from the run's dataset
    servers."""
    if config.train_data is not None:
        return Path(config.train_data)
    default = config.data_dir / TRAINING_DATA
    return default if default.is_dir() else None


def worker_argv(config: DaemonConfig) -> list[str]:
    folder = data_folder(config)
    return [
        sys.executable, "-m", "dandelion_p2p.worker",
        "--socket", str(config.control_socket_path),
        "--data-dir", str(config.data_dir),
        *(["--data", str(folder)] if folder is not None else []),
        "--log-level", config.log_level,
    ]


class WorkerSupervisor:
    """Keeps a worker process running while ``state`` wants one: fetches the run's config,
    launches the worker, and after it exits does what the state says (rest, start the next
    run's worker, or restart after a growing delay)."""

    def __init__(self, state: TrainingState, current: CurrentRun, session: WorkerSession,
                 config: DaemonConfig, me: bytes) -> None:
        """``me``: this peer's id, which a closed run must admit."""
        self.state = state
        self.current = current
        self.session = session
        self.config = config
        self.me = me
        self.worker: WorkerProcess | None = None
        """The process launched, from just before it starts until it has exited."""
        self._changed = trio.Event()
        self._gone = trio.Event()
        self._nursery: trio.Nursery | None = None

    def poke(self) -> None:
        """The intent changed (start, stop, join): look again."""
        self._changed.set()

    async def run(self, nursery: trio.Nursery) -> None:
        """Supervise until cancelled; ``nursery`` runs the stops asked of the worker."""
        self._nursery = nursery
        backoff = 1.0
        while True:
            self._changed = trio.Event()
            if not self.state.wanted:
                self.state.rest()
                await self._changed.wait()
                continue
            problem, torch_missing = await self._prepare()
            if problem is not None:
                log.info("not training: %s", problem)
                self.state.cannot_start(problem, torch_missing=torch_missing)
                continue
            if not self.state.wanted:
                continue  # stopped (or the daemon began to stop) while the run was fetched
            started = time.monotonic()
            self.state.launch()
            self._gone = trio.Event()
            self.worker = WorkerProcess(worker_argv(self.config), env=dict(os.environ))
            code = await self.worker.run(on_started=self._on_started)
            outcome = describe_exit(code, list(self.worker.tail))
            self.worker = None
            self.session.end()
            self._gone.set()
            crashes = self.state.crashes
            after = self.state.worker_exited(code, outcome.detail, outcome.restart)
            if self.state.crashes > crashes:
                log.error("training worker: %s", outcome.detail)
            if after is not AfterExit.RESTART:
                continue
            if time.monotonic() - started > STABLE_AFTER:
                backoff = 1.0
            self.state.restarting_in(backoff)
            with trio.move_on_after(backoff):
                await self._changed.wait()
            backoff = min(MAX_BACKOFF, backoff * 2)

    def _on_started(self, pid: int) -> None:
        self.session.pid = pid
        log.info("training worker started (pid %d) for run %s", pid, self.current.id)

    async def _prepare(self) -> tuple[str | None, bool]:
        """Whether the worker can start: (a reason it cannot, or None; whether torch is
        missing)."""
        if importlib.util.find_spec("torch") is None:
            return NO_TORCH, True
        try:
            document = await self.current.load()
        except ConfigError as exc:
            return f"run config: {exc}", False
        if document is None:
            return ("no run to train: start the daemon with --run RUN (`dandelion-p2p runs` "
                    "lists them) or --run-config, or join one from the web UI"), False
        refused = self.current.not_admitting(self.me)
        if refused is not None:
            return refused, False
        configured = self.config.train_data
        if configured is not None and not Path(configured).is_dir():
            return f"train_data {configured} is not a folder", False
        return None, False

    def stop_worker(self) -> None:
        """Ask the worker to stop (it finishes its step and writes a checkpoint) without
        holding up the caller; the supervision loop sees it exit."""
        if self.worker is not None and self._nursery is not None:
            self._nursery.start_soon(self.worker.stop)

    async def stop_and_wait(self) -> None:
        """Stop the worker and wait until it has exited and the loop has seen it. Cut short
        (cancelled), it kills the worker at once: no more grace."""
        worker = self.worker
        if worker is None:
            return
        try:
            await worker.stop()
            await self._gone.wait()
        except trio.Cancelled:
            worker.kill()
            raise
