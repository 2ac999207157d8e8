"""Where the daemon gets the run config its worker trains: pluggable.

``runconfig.get`` (the run's signed, published config, served by the runs subsystem) when
that control method exists; otherwise the local TOML file named by ``run_config``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dandelion_p2p.errors import ConfigError, DandelionError
from dandelion_p2p.runconfig.schema import RunConfig, loads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunDocument:
    run: str
    toml: str
    config: RunConfig
    origin: str
    """Where it came from, for messages."""


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
        text = answer.get("toml") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            return None
        return RunDocument(run, text, loads(text), f"run {run} (published)")


class ChainedSource:
    def __init__(self, sources: Sequence[RunSource]) -> None:
        self.sources = list(sources)

    async def fetch(self, run: str) -> RunDocument | None:
        for source in self.sources:
            found = await source.fetch(run)
            if found is not None:
                return found
        return None
