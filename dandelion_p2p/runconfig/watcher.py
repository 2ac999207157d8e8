"""Following a run's config: the newest valid version its owner published in the DHT.

``select_newest`` is the sans-IO part: from records read under a run's key it keeps the one
with the highest version among those signed by the run's owner and holding a valid TOML, and
says why it ignored the others. ``RunConfigWatcher`` polls the DHT with it. Each version
says from which global step it applies; which version is in force for a round is decided by
``timeline.ConfigTimeline`` from the versions a peer has verified.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from dandelion_p2p.errors import ConfigError, DandelionError, ProtocolViolation
from dandelion_p2p.identity import PeerId
from dandelion_p2p.net.dht.messages import SignedRecord
from dandelion_p2p.net.ports import RecordStore
from dandelion_p2p.runconfig.publication import CONFIG_NAMESPACE, decode_config
from dandelion_p2p.runconfig.schema import RunConfig, loads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfigVersion:
    """One verified version of a run's config."""

    run: str
    version: int
    owner: str
    toml: str
    config: RunConfig
    published_at: float
    effective_step: int = 0
    """The global step from which this version is in force."""

    def to_json(self) -> dict[str, object]:
        return {
            "run": self.run,
            "version": self.version,
            "effective_step": self.effective_step,
            "owner": self.owner,
            "toml": self.toml,
            "config": self.config.to_dict(),
            "published_at": self.published_at,
        }


@dataclass(frozen=True)
class Ignored:
    publisher: str
    version: int
    reason: str


def select_newest(
    run: str, records: Iterable[SignedRecord]
) -> tuple[RunConfigVersion | None, list[Ignored]]:
    """The newest valid version of ``run`` among ``records``, and what was ignored and why."""
    best: RunConfigVersion | None = None
    ignored: list[Ignored] = []
    for record in records:
        publisher = _b58(record.publisher)
        try:
            best = _consider(run, record, publisher, best, ignored)
        except Exception as exc:
            # One hostile record must never end the read of the others (nor the watcher).
            log.warning("run %s: skipped a config record of %s: %r", run, publisher, exc)
            ignored.append(Ignored(publisher, 0, f"unreadable record: {exc!r}"))
    return best, ignored


def _consider(
    run: str,
    record: SignedRecord,
    publisher: str,
    best: RunConfigVersion | None,
    ignored: list[Ignored],
) -> RunConfigVersion | None:
    """``best`` or, when ``record`` holds a newer valid version, that version."""
    try:
        value = decode_config(record.value)
    except ProtocolViolation as exc:
        ignored.append(Ignored(publisher, 0, f"invalid value: {exc}"))
        return best
    if value.run != run:
        ignored.append(
            Ignored(
                _b58(value.owner),
                value.version,
                f"config signed by {_b58(value.owner)}, who does not own run {run}",
            )
        )
        return best
    if best is not None and value.version <= best.version:
        return best
    try:
        config = loads(value.toml)
    except ConfigError as exc:
        ignored.append(Ignored(publisher, value.version, f"invalid config: {exc}"))
        return best
    if config.name != value.name:
        ignored.append(
            Ignored(publisher, value.version, "the TOML names another run than the record")
        )
        return best
    return RunConfigVersion(
        run=run,
        version=value.version,
        owner=_b58(value.owner),
        toml=value.toml,
        config=config,
        published_at=value.published_at_ms / 1000,
        effective_step=value.effective_step,
    )


def _b58(peer_id: bytes) -> str:
    try:
        return PeerId(peer_id).to_base58()
    except Exception:
        return peer_id.hex()


class RunConfigWatcher:
    """Keeps the newest verified config of ``run``; ``await changed(v)`` waits for a newer one.

    ``records`` is the DHT, only read. Each ignored value is logged once, at warning level: a
    config signed by another key is someone trying to steer the run.
    """

    def __init__(
        self, run: str, records: RecordStore, *, poll_interval: float = 10.0
    ) -> None:
        self.run = run
        self.records = records
        self.poll_interval = poll_interval
        self._current: RunConfigVersion | None = None
        self._changed = trio.Event()
        self._logged: set[tuple[str, int, str]] = set()
        self.ignored_count = 0

    def current(self) -> RunConfigVersion | None:
        return self._current

    async def changed(self, after_version: int = 0) -> RunConfigVersion:
        """Wait until a version newer than ``after_version`` is known, and return it.

        Cancellation leaves the watcher as it was.
        """
        while self._current is None or self._current.version <= after_version:
            await self._changed.wait()
        return self._current

    def offer(self, found: RunConfigVersion | None, ignored: list[Ignored]) -> bool:
        """Take the result of one read; True when it brought a newer version."""
        for item in ignored:
            key = (item.publisher, item.version, item.reason)
            if key not in self._logged:
                self._logged.add(key)
                self.ignored_count += 1
                log.warning("run %s: ignored config version %d: %s", self.run, item.version,
                            item.reason)
        if found is None or (self._current is not None and found.version <= self._current.version):
            return False
        previous = self._current
        self._current = found
        log.info(
            "run %s: config version %d, in force from global step %d (was %s)",
            self.run,
            found.version,
            found.effective_step,
            previous.version if previous else "none",
        )
        self._changed.set()
        self._changed = trio.Event()
        return True

    async def poll_once(self) -> bool:
        try:
            records = await self.records.get(CONFIG_NAMESPACE, self.run.encode())
        except DandelionError as exc:
            log.debug("reading the config of %s failed: %s", self.run, exc)
            return False
        return self.offer(*select_newest(self.run, records))

    async def run_forever(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED  # type: ignore[name-defined]
    ) -> None:
        task_status.started()
        while True:
            try:
                await self.poll_once()
            except Exception:
                # A bad poll costs one interval; ending here would take the daemon with it.
                log.exception("run %s: polling the config failed", self.run)
            await trio.sleep(self.poll_interval)

