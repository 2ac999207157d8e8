"""Publishing a run's config as its owner: validate, number the version, sign, store in the DHT.

The last published version of each run is kept in ``<data_dir>/runs/<run>.json`` so that a
restarted owner continues counting; the version read back from the DHT counts too, so an
owner whose state was lost never publishes a version that peers would take for an old one.
The same files rebuild the owner's ``runs`` listing at start, so publishing one run after a
restart does not drop the others from it.

Each version after the first applies from a global step (``effective_step``): the one asked
for, or by default one comfortably after the swarm's current step, rounded up to a round
boundary of the version in force, so every peer learns it before it applies.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from dandelion_p2p.errors import ConfigError, DandelionError
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.ports import RecordStore
from dandelion_p2p.runconfig.publication import (
    CONFIG_NAMESPACE,
    MAX_LISTED_RUNS,
    RECORD_TTL,
    RUNS_NAMESPACE,
    RunListing,
    RunListings,
    derive_run_id,
    encode_value,
    sign_config,
    sign_listing,
)
from dandelion_p2p.runconfig.schema import RunConfig, loads
from dandelion_p2p.runconfig.timeline import fixed_changes, round_boundary, round_up_to
from dandelion_p2p.runconfig.watcher import RunConfigVersion, select_newest

log = logging.getLogger(__name__)

SwarmStep = Callable[[str, RunConfig], Awaitable[int]]
"""The newest global step the run's peers report (-1: none known), given the run and the
config being published (a closed run's peers are the only ones asked)."""

ROUNDS_OF_NOTICE = 2
"""Rounds, beyond the checkpoint interval by which a reported step may lag, between the
swarm's step and a new version's default effective step: time for every peer to read it."""


@dataclass(frozen=True)
class Published:
    run: str
    version: int
    stored_on: int
    effective_step: int = 0


@dataclass(frozen=True)
class _Previous:
    version: int
    toml: str
    effective_step: int


class RunPublisher:
    """Publishes configs of runs owned by ``identity`` into ``records`` (the DHT)."""

    def __init__(
        self, identity: Identity, records: RecordStore, network: str, state_dir: Path
    ) -> None:
        self.identity = identity
        self.records = records
        self.network = network
        self.state_dir = state_dir
        self._listings: dict[str, RunListing] | None = None
        self._publishing = trio.Lock()
        """One publication at a time: two that overlap would both sign the next version
        number, with different texts."""

    @property
    def listings(self) -> dict[str, RunListing]:
        """Runs published from this data dir, listed in the network's ``runs`` record (read
        from the run states under ``state_dir`` when first asked for)."""
        if self._listings is None:
            self._listings = self._load_listings()
        return self._listings

    def _load_listings(self) -> dict[str, RunListing]:
        listings: list[RunListing] = []
        for path in sorted(self.state_dir.glob("*.json")):
            try:
                listing = self._listing_from_state(path)
            except Exception as exc:  # one damaged file must not hide the other runs
                log.warning("run state %s unreadable (%s); not listed", path, exc)
                continue
            if listing is not None:
                listings.append(listing)
        newest_first = sorted(listings, key=lambda r: r.updated_at_ms, reverse=True)
        return {r.run: r for r in newest_first[:MAX_LISTED_RUNS]}

    def _listing_from_state(self, path: Path) -> RunListing | None:
        data = json.loads(path.read_text())
        version, toml = int(data["version"]), str(data["toml"])
        config = loads(toml)
        run = self.run_id(config.name)
        if path.name != f"{run}.json" or version < 1:
            return None  # another key's state, or not a published version
        published_at_ms = data.get("published_at_ms")
        if not isinstance(published_at_ms, int) or isinstance(published_at_ms, bool):
            published_at_ms = int(path.stat().st_mtime * 1000)
        signed = sign_config(self.identity, config.name, version, toml,
                             published_at_ms=published_at_ms)
        return sign_listing(self.identity, signed, config.model.base)

    def run_id(self, name: str) -> str:
        return derive_run_id(self.identity.peer_id_bytes, name)

    def _state_path(self, run: str) -> Path:
        return self.state_dir / f"{run}.json"

    def last_version(self, run: str) -> tuple[int, str]:
        """(version, toml) last published from this machine; (0, "") if none."""
        last = self._last_published(run)
        return last.version, last.toml

    def _last_published(self, run: str) -> _Previous:
        try:
            data = json.loads(self._state_path(run).read_text())
            effective = data.get("effective_step", 0)
            return _Previous(int(data["version"]), str(data["toml"]),
                             effective if isinstance(effective, int) else 0)
        except FileNotFoundError:
            return _Previous(0, "", 0)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("run state %s unreadable (%s); taking the DHT's version", run, exc)
            return _Previous(0, "", 0)

    def _save(self, run: str, version: int, toml: str, published_at_ms: int,
              effective_step: int) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self._state_path(run)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump({"run": run, "version": version, "toml": toml,
                       "published_at_ms": published_at_ms, "effective_step": effective_step},
                      f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    async def newest_in_dht(self, run: str) -> RunConfigVersion | None:
        try:
            records = await self.records.get(CONFIG_NAMESPACE, run.encode())
        except DandelionError as exc:
            log.info("could not read %s from the DHT: %s", run, exc)
            return None
        found, _ = select_newest(run, records)
        return found

    async def publish(self, toml: str, *, only_if_changed: bool = False,
                      at_step: int | None = None,
                      swarm_step: SwarmStep | None = None) -> Published:
        """Validate ``toml`` and publish it as the next version of its run.

        With ``only_if_changed``, a text equal to the last published one is republished under
        its old version and effective step instead (used at start-up, where the file usually
        did not change).

        The first version applies from step 0. A later one applies from ``at_step`` rounded up
        to a round boundary of the version before it, or by default from a step
        ``ROUNDS_OF_NOTICE`` rounds plus one checkpoint interval after the newest step
        ``swarm_step`` finds (step 0 when it finds none).

        Raises:
            ConfigError: the TOML is invalid, too large for a DHT record, or changes a setting
                that a running run cannot change; or ``at_step`` is given for a first version.
        """
        config = loads(toml)
        async with self._publishing:
            return await self._publish(config, toml, only_if_changed, at_step, swarm_step)

    async def _publish(self, config: RunConfig, toml: str, only_if_changed: bool,
                       at_step: int | None, swarm_step: SwarmStep | None) -> Published:
        run = self.run_id(config.name)
        local = self._last_published(run)
        newest = await self.newest_in_dht(run)
        previous = local
        if newest is not None and newest.version > local.version:
            previous = _Previous(newest.version, newest.toml, newest.effective_step)
        if only_if_changed and local.toml == toml and local.version >= max(previous.version, 1):
            version, effective_step = local.version, local.effective_step
        else:
            version = previous.version + 1
            effective_step = await self._effective_step(run, config, previous, at_step,
                                                        swarm_step)
        signed = sign_config(self.identity, config.name, version, toml,
                             effective_step=effective_step)
        value = encode_value(signed)
        listing = sign_listing(self.identity, signed, config.model.base)
        listed = {**self.listings, run: listing}
        newest_first = sorted(listed.values(), key=lambda r: r.updated_at_ms, reverse=True)
        listings = encode_value(RunListings(runs=tuple(newest_first[:MAX_LISTED_RUNS])))
        self._save(run, version, toml, signed.published_at_ms, effective_step)
        self._listings = {r.run: r for r in newest_first[:MAX_LISTED_RUNS]}
        stored = await self.records.put(CONFIG_NAMESPACE, run.encode(), value, RECORD_TTL)
        await self.records.put(RUNS_NAMESPACE, self.network.encode(), listings, RECORD_TTL)
        log.info("published run %s config version %d, in force from global step %d (stored "
                 "on %d peers)", run, version, effective_step, stored)
        return Published(run, version, stored, effective_step)

    async def _effective_step(self, run: str, config: RunConfig, previous: _Previous,
                              at_step: int | None, swarm_step: SwarmStep | None) -> int:
        if previous.version == 0:
            if at_step:
                raise ConfigError("the first version of a run applies from step 0: "
                                  "publish it without a step")
            return 0
        try:
            before = loads(previous.toml)
        except ConfigError:
            before = None  # an unreadable predecessor in force nowhere: nothing to keep
        if before is not None:
            changed = fixed_changes(before, config)
            if changed:
                raise ConfigError(
                    f"version {previous.version + 1} would change {', '.join(changed)}, which "
                    "a running run cannot change: start a new run (another name) instead")
        boundary = round_boundary(before or config)
        if at_step is not None:
            if not 0 <= at_step < 2**53:
                raise ConfigError(f"at_step {at_step}: a global step, 0 to 2^53 - 1")
            effective = round_up_to(at_step, boundary)
            if effective != at_step:
                log.info("run %s: step %d is not a round boundary; the new version applies "
                         "from step %d", run, at_step, effective)
            return effective
        current = await swarm_step(run, config) if swarm_step is not None else -1
        every = (before or config).checkpoint.every_steps
        return round_up_to(max(current, 0) + every + ROUNDS_OF_NOTICE * boundary, boundary)


def require_owner(identity: Identity, run: str, name: str) -> None:
    if derive_run_id(identity.peer_id_bytes, name) != run:
        raise ConfigError(f"run {run} is owned by another key; only its owner can publish it")
