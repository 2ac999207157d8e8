"""The daemon service for runs and datasets.

On every daemon: the control methods ``runs.list``, ``runconfig.get``, ``runconfig.publish``
and ``dataset.status``, plus ``dataset.lease``, ``dataset.fetch`` and ``dataset.complete``
for the training worker (a separate process: it gets chunks as files in the cache). Runs the
daemon asks about are watched from then on; ``--run`` is watched from the start.

With ``--dataset DIR --run-config FILE``: the dataset role (leases, receipts, chunk serving),
and, when this daemon's key signed the dataset's manifest, publication of the run config.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import OrderedDict
from pathlib import Path
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dandelion_p2p.context import DaemonContext
from dandelion_p2p.dataset.chunks import MAX_CHUNK_BYTES
from dandelion_p2p.dataset.client import DatasetClient
from dandelion_p2p.dataset.leases import LeaseBook
from dandelion_p2p.dataset.manifest import load_manifest
from dandelion_p2p.dataset.messages import CHUNK_PROTOCOL, LeaseGrant
from dandelion_p2p.dataset.server import DatasetServer, violation_sink
from dandelion_p2p.dataset.transfer import serve_chunks
from dandelion_p2p.errors import ConfigError, DandelionError
from dandelion_p2p.identity import PeerId
from dandelion_p2p.net.ports import RecordStore
from dandelion_p2p.runconfig.admission import NOT_ADMITTED
from dandelion_p2p.runconfig.directory import list_runs
from dandelion_p2p.runconfig.publication import derive_run_id, is_run_id
from dandelion_p2p.runconfig.publisher import RunPublisher
from dandelion_p2p.runconfig.schema import RunConfig, loads
from dandelion_p2p.runconfig.watcher import RunConfigVersion, RunConfigWatcher

log = logging.getLogger(__name__)

WATCH_INTERVAL = 5.0
START_PUBLISH_TIMEOUT = 20.0
MAX_WATCHED_RUNS = 16
MAX_OPEN_LEASES = 64
SWARM_STEP_METHOD = "training.swarm_step"


def _read_run_config(path: Path) -> tuple[str, RunConfig]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read run config {path}: {exc}") from None
    try:
        return text, loads(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _run_param(params: dict[str, Any], default: str) -> str:
    run = params.get("run") or default
    if not isinstance(run, str) or not is_run_id(run):
        raise ConfigError("'run' must be a run id (<name>-<24 hex digits>)")
    return run


class RunsService:
    name = "runs"

    def __init__(self, ctx: DaemonContext) -> None:
        self.ctx = ctx
        self.node = ctx.node
        self.server: DatasetServer | None = None
        self.clients: dict[str, DatasetClient] = {}
        self.watchers: OrderedDict[str, RunConfigWatcher] = OrderedDict()
        """Runs followed, least recently used first."""
        self._watch_scopes: dict[str, trio.CancelScope] = {}
        self.start_toml: str | None = None
        self._leases: dict[int, tuple[DatasetClient, LeaseGrant, float]] = {}
        """Leases taken for this node's worker and not yet completed, by a handle of this
        daemon's (servers number their leases independently): client, grant, and the trio
        time the lease expires (the server grants the chunk again after that)."""
        self._publisher: RunPublisher | None = None
        self._nursery: trio.Nursery | None = None
        self._prepare_dataset_role()
        self.run_id = ctx.config.run if is_run_id(ctx.config.run) else ""
        if ctx.config.run and not self.run_id:
            log.warning("--run %r is not a run id (<name>-<24 hex digits>); its config and "
                        "data cannot be followed (`dandelion-p2p runs` lists run ids)",
                        ctx.config.run)
        ctx.add_handlers(
            {
                "runs.list": self.runs_list,
                "runconfig.get": self.runconfig_get,
                "runconfig.publish": self.runconfig_publish,
                "dataset.status": self.dataset_status,
                "dataset.lease": self.dataset_lease,
                "dataset.fetch": self.dataset_fetch,
                "dataset.complete": self.dataset_complete,
            }
        )
        ctx.status_sections["dataset"] = self.status

    def _prepare_dataset_role(self) -> None:
        config = self.ctx.config
        if config.dataset is None:
            # A run owner without a dataset of its own still publishes its run's config.
            if config.run_config is not None:
                self.start_toml, _ = _read_run_config(config.run_config)
            return
        if config.run_config is None:
            raise ConfigError("--dataset needs --run-config: the run the dataset is for")
        self.start_toml, run_config = _read_run_config(config.run_config)
        manifest = load_manifest(config.dataset)
        DatasetServer.check_files(manifest, config.dataset)
        owner = ID.from_base58(manifest.owner).to_bytes()
        run = derive_run_id(owner, run_config.name)
        if owner != self.ctx.identity.peer_id_bytes:
            self.start_toml = None
            log.info("serving run %s for its owner %s; the owner publishes its config",
                     run, manifest.owner)
        book = LeaseBook(config.data_dir / "dataset" / f"{run}.sqlite", manifest, run)
        self.server = DatasetServer(
            run, manifest, config.dataset, book, run_config.dataset,
            host=self.node.host, records=self.records, scores=self.node,
            admission=run_config.admission,
        )

    @property
    def records(self) -> RecordStore:
        """The node's DHT.

        Raises:
            ConfigError: the DHT is not running yet.
        """
        if self.node.dht is None:
            raise ConfigError("the DHT is not running yet")
        return self.node.records

    def publisher(self) -> RunPublisher:
        if self._publisher is None:
            self._publisher = RunPublisher(
                self.ctx.identity, self.records, self.node.settings.network,
                self.ctx.config.data_dir / "runs",
            )
        return self._publisher

    def _pinned(self) -> set[str]:
        """Runs followed for good: the one this daemon joined and the one it serves."""
        pinned = {self.run_id} if self.run_id else set()
        if self.server is not None:
            pinned.add(self.server.run)
        return pinned

    def watch(self, watcher: RunConfigWatcher) -> RunConfigWatcher:
        """Keep following ``watcher``'s run (polling the DHT), evicting the least recently
        used run that is neither joined nor served when ``MAX_WATCHED_RUNS`` are followed."""
        known = self.watchers.get(watcher.run)
        if known is not None:
            self.watchers.move_to_end(watcher.run)
            return known
        pinned = self._pinned()
        while len(self.watchers) >= MAX_WATCHED_RUNS:
            victim = next((r for r in self.watchers if r not in pinned), None)
            if victim is None:
                raise ConfigError(f"already following {MAX_WATCHED_RUNS} runs")
            self.watchers.pop(victim)
            scope = self._watch_scopes.pop(victim, None)
            if scope is not None:
                scope.cancel()
            log.debug("stopped following run %s (least recently used)", victim)
        self.watchers[watcher.run] = watcher
        self._start_watching(watcher)
        return watcher

    def _start_watching(self, watcher: RunConfigWatcher) -> None:
        if self._nursery is None or watcher.run in self._watch_scopes:
            return
        scope = trio.CancelScope()
        self._watch_scopes[watcher.run] = scope

        async def follow() -> None:
            with scope:
                await watcher.run_forever()

        self._nursery.start_soon(follow)

    def watcher(self, run: str) -> RunConfigWatcher:
        """The watcher of a followed ``run``, or a new one not yet followed (see ``watch``)."""
        watcher = self.watchers.get(run)
        if watcher is not None:
            self.watchers.move_to_end(run)
            return watcher
        return RunConfigWatcher(run, self.records, poll_interval=WATCH_INTERVAL)

    def client(self, run: str) -> DatasetClient:
        client = self.clients.get(run)
        if client is None:
            if len(self.clients) >= MAX_WATCHED_RUNS:
                raise ConfigError(f"already training in {MAX_WATCHED_RUNS} runs")
            cache = self.ctx.config.data_dir / "chunk-cache" / run
            client = self.clients[run] = DatasetClient(
                run, cache, host=self.node.host, signer=self.node.identity,
                records=self.records, links=self.node, scores=self.node,
            )
        return client

    def chunk_source(self, name: str) -> Path | bytes | None:
        """Chunks this daemon serves: its dataset's, then those cached for training."""
        if self.server is not None and (path := self.server.source(name)) is not None:
            return path
        for client in self.clients.values():
            if (path := client.source(name)) is not None:
                return path
        return None

    def refuse_chunk(self, peer: ID, name: str) -> str | None:
        """Why ``peer`` may not have chunk ``name`` (one of a closed run that does not admit
        it anywhere the chunk is held here), or None."""
        key = peer.to_bytes()
        held = False
        if self.server is not None and self.server.source(name) is not None:
            if self.server.admission.admits(key):
                return None
            held = True
        for client in self.clients.values():
            if client.source(name) is not None:
                if client.may_serve(key):
                    return None  # the same bytes, held for a run that admits the peer
                held = True
        return NOT_ADMITTED if held else None

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED  # type: ignore[name-defined]
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for watcher in self.watchers.values():
                    self._start_watching(watcher)
                if self.server is not None:
                    self.server.install(chunks=False)
                self.node.host.set_stream_handler(
                    TProtocol(CHUNK_PROTOCOL),
                    serve_chunks(self.chunk_source, on_violation=violation_sink(self.node),
                                 refuse=self.node.is_banned, refuse_chunk=self.refuse_chunk),
                )
                if self.start_toml is not None:
                    with trio.move_on_after(START_PUBLISH_TIMEOUT):
                        try:
                            await self.publisher().publish(
                                self.start_toml, only_if_changed=True,
                                swarm_step=self._swarm_step)
                        except DandelionError as exc:
                            log.warning("publishing the run config failed: %s", exc)
                if self.server is not None:
                    nursery.start_soon(self._announce_server)
                    self.watch(self.watcher(self.server.run))
                if self.run_id:
                    self.watch(self.watcher(self.run_id))
                    self.client(self.run_id)
                task_status.started()
        finally:
            if self.server is not None:
                self.server.book.close()

    async def _announce_server(self) -> None:
        assert self.server is not None
        try:
            stored = await self.server.announce()
            log.info("dataset server of %s announced (stored on %d peers)", self.server.run,
                     stored)
        except DandelionError as exc:
            log.warning("announcing the dataset server failed: %s", exc)

    def _default_run(self) -> str:
        return self.run_id or (self.server.run if self.server else "")

    # ---- control methods -----------------------------------------------------------------

    async def runs_list(self, params: dict[str, Any]) -> dict[str, Any]:
        runs = await list_runs(self.records, self.node.settings.network)
        return {"runs": [r.to_json() for r in runs]}

    async def run_config_of(self, run: str) -> RunConfigVersion | None:
        """The newest verified config of ``run``, read from the DHT if not known yet.

        A run not followed yet is read once and followed from then on only if it has a
        config: asking about run ids that do not exist costs one DHT read each, no slot.
        """
        watcher = self.watcher(run)
        if watcher.current() is None:
            await watcher.poll_once()
        if watcher.current() is not None or run in self._pinned():
            self.watch(watcher)
        return watcher.current()

    async def runconfig_get(self, params: dict[str, Any]) -> dict[str, Any]:
        run = _run_param(params, self._default_run())
        current = await self.run_config_of(run)
        if current is None:
            raise ConfigError(f"no config of run {run} found in the DHT")
        return current.to_json()

    async def runconfig_publish(self, params: dict[str, Any]) -> dict[str, Any]:
        toml = params.get("toml")
        if not isinstance(toml, str):
            raise ConfigError("missing 'toml' (the run config text)")
        at_step = params.get("at_step")
        if at_step is not None and (isinstance(at_step, bool) or not isinstance(at_step, int)):
            raise ConfigError(f"'at_step' must be a global step, got {at_step!r}")
        published = await self.publisher().publish(toml, at_step=at_step,
                                                    swarm_step=self._swarm_step)
        watcher = self.watchers.get(published.run)
        if watcher is not None:
            await watcher.poll_once()
        return {"run": published.run, "version": published.version,
                "stored_on": published.stored_on, "effective_step": published.effective_step}

    async def _swarm_step(self, run: str, config: RunConfig) -> int:
        """The swarm's checkpoint step of ``run`` (-1: unknown), from the training service,
        which speaks the state protocol that answers it."""
        ask = self.ctx.handlers.get(SWARM_STEP_METHOD)
        if ask is None:
            return -1
        params: dict[str, Any] = {"run": run}
        if config.admission.peers:
            # A closed run's step is what its own peers hold, never what outsiders say (the
            # list is fixed for the run: the version published has the run's own).
            params["admitted"] = list(config.admission.peers)
        try:
            answer = await ask(params)
        except DandelionError as exc:
            log.debug("step of %s: %s", run, exc)
            return -1
        step = answer.get("step") if isinstance(answer, dict) else None
        return step if isinstance(step, int) and not isinstance(step, bool) else -1

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "server" if self.server else "none"}
        if self.server is not None:
            out.update(self.server.status())
        out["clients"] = {
            run: {
                "cached_chunks": len(client.cached()),
                "rejected_holders": len(client.rejected_holders),
            }
            for run, client in self.clients.items()
        }
        out["open_leases"] = len(self._leases)
        out["watching"] = {
            run: (current.version if (current := w.current()) else None)
            for run, w in self.watchers.items()
        }
        return out

    async def dataset_status(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def dataset_lease(self, params: dict[str, Any]) -> dict[str, Any]:
        """``{"run"?, "wait"?, "resume"?}`` -> a lease.

        Waits while every chunk of the epoch is out: without end, or at most ``wait``
        seconds, after which the answer is ``{"chunk": null}``. ``resume`` (a lease id, or
        -1): hand back a lease of the run this daemon holds open, that one if it is held, so a
        restarted worker goes on with it rather than leaving it to expire.
        """
        resume = params.get("resume")
        if resume is not None:
            if isinstance(resume, bool) or not isinstance(resume, int):
                raise ConfigError(f"'resume' must be a lease id, got {resume!r}")
            held = self._held_lease(_run_param(params, self.run_id), resume)
            if held is not None:
                return self._lease_answer(held)
        wait = params.get("wait")
        if wait is not None and (
            isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 < wait <= 3600
        ):
            raise ConfigError(f"'wait' must be a number of seconds in (0, 3600], got {wait!r}")
        self._forget_expired_leases()
        if len(self._leases) >= MAX_OPEN_LEASES:
            raise ConfigError(f"{MAX_OPEN_LEASES} leases are open; complete some first")
        run = _run_param(params, self.run_id)
        client = await self._configured_client(run)
        grant = await client.lease(wait=math.inf if wait is None else float(wait))
        if grant is None:
            return {"run": run, "chunk": None}
        handle = secrets.randbelow(2**31 - 1) + 1
        while handle in self._leases:
            handle = secrets.randbelow(2**31 - 1) + 1
        self._leases[handle] = (client, grant, trio.current_time() + grant.expires_in_ms / 1000)
        return self._lease_answer(handle)

    async def _configured_client(self, run: str) -> DatasetClient:
        """The run's client, told what the owner-signed config says: the manifest every grant
        is checked against, and a closed run's peers (once known, a config not read this
        time unsets neither)."""
        client = self.client(run)
        try:
            current = await self.run_config_of(run)
        except ConfigError as exc:  # the DHT is not up yet: the client says what it lacks
            log.info("run %s: config not readable now (%s)", run, exc)
            current = None
        if current is not None:
            client.expected_manifest = current.config.dataset.manifest
            admitted = current.config.admission.admitted()
            client.restrict_to(None if admitted is None
                               else admitted | {PeerId.from_base58(current.owner).to_bytes()})
        return client

    def _forget_expired_leases(self) -> None:
        now = trio.current_time()
        for lease_id in [i for i, (_, _, expiry) in self._leases.items() if expiry <= now]:
            del self._leases[lease_id]

    def _held_lease(self, run: str, preferred: int) -> int | None:
        """The handle of an open lease of ``run``: ``preferred`` if held, else the newest."""
        self._forget_expired_leases()
        if preferred in self._leases:
            return preferred
        held = [(expiry, handle) for handle, (_, grant, expiry) in self._leases.items()
                if grant.run == run]
        return max(held)[1] if held else None

    def _lease_answer(self, handle: int) -> dict[str, Any]:
        grant = self._leases[handle][1]
        return {
            "run": grant.run,
            "lease_id": handle,
            "server_lease_id": grant.lease_id,
            "epoch": grant.epoch,
            "chunk": grant.chunk,
            "samples": grant.samples,
            "size": grant.size,
            "expires_in": grant.expires_in_ms / 1000,
        }

    async def dataset_fetch(self, params: dict[str, Any]) -> dict[str, Any]:
        """``{"chunk", "run"?, "size"?}`` -> ``{"chunk", "path"}`` of the verified chunk file."""
        client = await self._configured_client(_run_param(params, self.run_id))
        chunk = params.get("chunk")
        if not isinstance(chunk, str):
            raise ConfigError("missing 'chunk' (a chunk hash)")
        size = params.get("size")
        if size is not None and (
            not isinstance(size, int) or isinstance(size, bool)
            or not 1 <= size <= MAX_CHUNK_BYTES
        ):
            raise ConfigError(f"'size' must be an integer 1..{MAX_CHUNK_BYTES}, got {size!r}")
        await client.fetch(chunk, expected_size=size)
        path = client.path(chunk)
        return {"chunk": chunk, "path": str(path) if path else ""}

    async def dataset_complete(self, params: dict[str, Any]) -> dict[str, Any]:
        """``{"lease_id", "samples"?}`` -> the server's count of the epoch's completed chunks."""
        lease_id = params.get("lease_id")
        if not isinstance(lease_id, int) or lease_id not in self._leases:
            raise ConfigError(f"no open lease {lease_id!r} on this daemon")
        client, grant, _ = self._leases[lease_id]
        samples = params.get("samples")
        ack = await client.complete(grant, samples if isinstance(samples, int) else None)
        self._leases.pop(lease_id, None)
        return {"epoch": ack.epoch, "completed": ack.completed, "total": ack.total}


def create(ctx: DaemonContext) -> RunsService:
    return RunsService(ctx)
