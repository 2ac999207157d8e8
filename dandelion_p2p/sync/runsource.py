"""Where the daemon gets the run config its worker trains: pluggable.

``runconfig.get`` (the run's signed, published config, served by the runs subsystem) when
that control method exists; otherwise the local TOML file named by ``run_config``.
``RunVersions`` keeps every version the daemon has seen of its run, to say which one is in
force for a round.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeGuard

from dandelion_p2p.errors import ConfigError, DandelionError
from dandelion_p2p.identity import PeerId
from dandelion_p2p.runconfig.schema import RunConfig, loads
from dandelion_p2p.runconfig.timeline import ConfigTimeline
from dandelion_p2p.worker.protocol import work_dir_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDocument:
    run: str
    toml: str
    config: RunConfig
    origin: str
    """Where it came from, for messages."""
    version: int = 0
    """The published version; 0 for a local file."""
    effective_step: int = 0
    """The global step from which this version is in force."""


class RunSource(Protocol):
    async def fetch(self, run: str) -> RunDocument | None:
        """The run's config; None when this source does not know the run.

        Raises:
            ConfigError: the source has the run but its config is invalid.
        """
        ...


class LocalFileSource:
    def __init__(self, path: Path | None) -> None:
        self.path = path

    async def fetch(self, run: str) -> RunDocument | None:
        if self.path is None:
            return None
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read run config {self.path}: {exc.strerror}") from None
        config = loads(text)
        run_id = run or config.name
        if run and run != config.name:
            log.info("run %s: the local run config %s names run %s; using it for %s",
                     run, self.path, config.name, run)
        return RunDocument(run_id, text, config, str(self.path))


class ControlMethodSource:
    """Asks the ``runconfig.get`` control method, when some service provides it."""

    def __init__(self, handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]) -> None:
        self.handlers = handlers

    async def fetch(self, run: str) -> RunDocument | None:
        handler = self.handlers.get("runconfig.get")
        if handler is None or not run:
            return None
        try:
            answer = await handler({"run": run})
        except DandelionError as exc:
            log.info("runconfig.get %s: %s", run, exc)
            return None
        except Exception:
            log.exception("runconfig.get %s failed", run)
            return None
        if not isinstance(answer, dict):
            return None
        text, version, effective = (answer.get(k) for k in ("toml", "version", "effective_step"))
        if not isinstance(text, str) or not _is_count(version) or not _is_count(effective):
            return None
        return RunDocument(run, text, loads(text), f"run {run} (published)", version, effective)


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class ChainedSource:
    def __init__(self, sources: Sequence[RunSource]) -> None:
        self.sources = list(sources)

    async def fetch(self, run: str) -> RunDocument | None:
        for source in self.sources:
            found = await source.fetch(run)
            if found is not None:
                return found
        return None


class RunVersions:
    """The versions of one run's config this daemon has seen, and which is in force when.

    A local file is version 0, in force throughout, and read once: editing it does not change
    a running run. A published run is read again at every round (from the runs service's
    watcher, no network read), so each new version is known as soon as the watcher has it.
    """

    def __init__(self, run: str) -> None:
        self.run = run
        self.timeline: ConfigTimeline[RunDocument] = ConfigTimeline()

    def offer(self, document: RunDocument) -> None:
        if self.timeline.get(document.version) is not None:
            return
        refused = self.timeline.add(document)
        if refused is not None:
            log.warning("run %s: config version %d refused: %s", self.run, document.version,
                        refused)
        elif document.version > 0:
            log.info("run %s: config version %d is in force from global step %d",
                     self.run, document.version, document.effective_step)

    async def refresh(self, source: RunSource) -> None:
        """Learn the newest published version; a read that fails leaves what is known."""
        newest = self.timeline.newest()
        if newest is None or newest.version == 0:
            return
        try:
            document = await source.fetch(self.run)
        except ConfigError as exc:
            log.info("run %s: newest config unreadable: %s", self.run, exc)
            return
        if document is not None and document.run == self.run:
            self.offer(document)

    def in_force(self, step: int) -> RunDocument | None:
        return self.timeline.in_force(step)

    def newest(self) -> RunDocument | None:
        return self.timeline.newest()

    def newer_than(self, version: int) -> list[RunDocument]:
        return self.timeline.newer_than(version)


class CurrentRun:
    """The run this daemon trains: its id, its config once fetched, the versions seen of it,
    and where its worker keeps the checkpoints served to joining peers."""

    def __init__(self, run: str, source: RunSource, worker_dir: Path) -> None:
        self.id = run
        self.source = source
        self.worker_dir = worker_dir
        """``DATA_DIR/worker``: each run config's worker folder is under it, by name."""
        self.document: RunDocument | None = None
        self.checkpoint_dir: Path | None = None
        """The folder the worker named in its last ``worker.catch_up``."""
        self._versions: RunVersions | None = None

    async def load(self) -> RunDocument | None:
        """Fetch the run's config and make it the one trained; None when no source has it.

        Raises:
            ConfigError: a source has the run but its config is invalid.
        """
        document = await self.source.fetch(self.id)
        if document is not None:
            self.document, self.id = document, document.run
        return document

    def switch(self, run: str) -> None:
        """Train ``run`` from now on; its config is fetched when the next worker starts."""
        self.id = run
        self.document = None
        # The last worker's folder belongs to the run left: nothing of it is served as
        # ``run``'s until the next worker names its own.
        self.checkpoint_dir = None

    def not_admitting(self, me: bytes) -> str | None:
        """Why this peer (``me``) may not train the loaded run (a closed run that does not
        list it), or None."""
        if self.document is None or self.document.config.admission.admits(me):
            return None
        return (f"run {self.id} is closed and its config (admission.peers) does not list this "
                f"peer, {PeerId(me)}: ask its owner to add it")

    def versions(self) -> RunVersions:
        """The versions known of the run, ``document`` among them (it must be loaded)."""
        assert self.document is not None
        if self._versions is None or self._versions.run != self.id:
            self._versions = RunVersions(self.id)
        self._versions.offer(self.document)
        return self._versions

    def checkpoints(self) -> Path | None:
        """Where the worker keeps its checkpoints; None before the run is known."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        if self.document is None:
            return None
        folder = work_dir_for(self.worker_dir, self.document.config.name, self.id)
        return folder / "checkpoints"
