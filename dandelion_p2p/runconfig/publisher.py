"""Publishing a run's config as its owner: validate, number the version, sign, store in the DHT.

The last published version of each run is kept in ``<data_dir>/runs/<run>.json`` so that a
restarted owner continues counting; the version read back from the DHT counts too, so an
owner whose state was lost never publishes a version that peers would take for an old one.
The same files rebuild the owner's ``runs`` listing at start, so publishing one run after a
restart does not drop the others from it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dandelion_p2p.errors import ConfigError, DandelionError
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht.node import DHTNode
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
from dandelion_p2p.runconfig.schema import loads
from dandelion_p2p.runconfig.watcher import RunConfigVersion, select_newest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    run: str
    version: int
    stored_on: int


class RunPublisher:
    """Publishes configs of runs owned by ``identity`` into ``dht``."""

    def __init__(self, identity: Identity, dht: DHTNode, network: str, state_dir: Path) -> None:
        self.identity = identity
        self.dht = dht
        self.network = network
        self.state_dir = state_dir
        self.listings: dict[str, RunListing] = self._load_listings()
        """Runs published from this data dir, listed in the network's ``runs`` record."""

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
        try:
            data = json.loads(self._state_path(run).read_text())
            return int(data["version"]), str(data["toml"])
        except FileNotFoundError:
            return 0, ""
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("run state %s unreadable (%s); taking the DHT's version", run, exc)
            return 0, ""

    def _save(self, run: str, version: int, toml: str, published_at_ms: int) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self._state_path(run)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump({"run": run, "version": version, "toml": toml,
                       "published_at_ms": published_at_ms}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    async def newest_in_dht(self, run: str) -> RunConfigVersion | None:
        try:
            records = await self.dht.get(CONFIG_NAMESPACE, run.encode())
        except DandelionError as exc:
            log.info("could not read %s from the DHT: %s", run, exc)
            return None
        found, _ = select_newest(run, records)
        return found

    async def publish(self, toml: str, *, only_if_changed: bool = False) -> Published:
        """Validate ``toml`` and publish it as the next version of its run.

        With ``only_if_changed``, a text equal to the last published one is republished under
        its old version instead (used at start-up, where the file usually did not change).

        Raises:
            ConfigError: the TOML is invalid or too large for a DHT record.
        """
        config = loads(toml)
        run = self.run_id(config.name)
        local_version, local_toml = self.last_version(run)
        newest = await self.newest_in_dht(run)
        dht_version = newest.version if newest else 0
        if only_if_changed and local_toml == toml and local_version >= max(dht_version, 1):
            version = local_version
        else:
            version = max(local_version, dht_version) + 1
        signed = sign_config(self.identity, config.name, version, toml)
        value = encode_value(signed)
        listing = sign_listing(self.identity, signed, config.model.base)
        listed = {**self.listings, run: listing}
        newest_first = sorted(listed.values(), key=lambda r: r.updated_at_ms, reverse=True)
        listings = encode_value(RunListings(runs=tuple(newest_first[:MAX_LISTED_RUNS])))
        self._save(run, version, toml, signed.published_at_ms)
        self.listings = {r.run: r for r in newest_first[:MAX_LISTED_RUNS]}
        stored = await self.dht.put(CONFIG_NAMESPACE, run.encode(), value, RECORD_TTL)
        await self.dht.put(RUNS_NAMESPACE, self.network.encode(), listings, RECORD_TTL)
        log.info("published run %s config version %d (stored on %d peers)", run, version, stored)
        return Published(run, version, stored)


def require_owner(identity: Identity, run: str, name: str) -> None:
    if derive_run_id(identity.peer_id_bytes, name) != run:
        raise ConfigError(f"run {run} is owned by another key; only its owner can publish it")
