"""Runs the worker process, restarts it when it crashes, and says why it stopped.

The worker is a child process: whatever happens in it (a Python exception, CUDA out of
memory, the kernel's OOM killer) ends that process only. Its output is copied line by line
into the daemon's log. After a crash it is restarted with a growing delay, except after a
configuration error (exit code 2), which a restart would only repeat.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)
worker_log = logging.getLogger("dandelion_p2p.worker.process")

EXIT_CONFIG = 2
EXIT_OOM = 3
STOP_GRACE = 30.0
"""Seconds a worker gets after SIGTERM to finish its step and write a checkpoint."""
MAX_BACKOFF = 60.0
STABLE_AFTER = 120.0
"""A worker that ran this long before crashing restarts at the shortest delay again."""


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
