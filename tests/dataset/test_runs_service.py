"""The runs service in one trio loop with real swarm nodes: which runs it follows, and how it
checks what the training worker asks of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from dandelion_p2p.config import DaemonConfig
from dandelion_p2p.context import DaemonContext
from dandelion_p2p.dataplane.service import DataPlane
from dandelion_p2p.dataset.chunks import MAX_CHUNK_BYTES
from dandelion_p2p.dataset.manifest import signed_digest, signed_document
from dandelion_p2p.dataset.service import MAX_WATCHED_RUNS, RunsService
from dandelion_p2p.errors import ConfigError, PeerUnavailable
from dandelion_p2p.identity import Identity
from dandelion_p2p.loghub import LogHub
from dandelion_p2p.net.node import SwarmNode
from dandelion_p2p.runconfig.publication import derive_run_id
from dandelion_p2p.runconfig.publisher import RunPublisher
from dandelion_p2p.telemetry import Telemetry
from tests.dataset.helpers import packed_dataset, run_toml, serve_dataset
from tests.swarm import swarm


@asynccontextmanager
async def runs_service(node: SwarmNode, tmp_path: Path, **config: Any
                       ) -> AsyncIterator[RunsService]:
    ctx = DaemonContext(
        config=DaemonConfig(**{"data_dir": tmp_path / "daemon", "webui": False,
                               "worker": False, **config}),
        identity=node.identity,
        node=node,
        dataplane=DataPlane(node.host, node.identity, listen_ip="127.0.0.1", reachable=True),
        logs=LogHub(),
        telemetry=Telemetry(),
    )
    service = RunsService(ctx)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield service
        nursery.cancel_scope.cancel()


async def test_lookups_of_missing_runs_take_no_slot_and_old_runs_make_room(
    tmp_path: Path,
) -> None:
    async with swarm(2) as (owner, node):
        assert owner.dht is not None
        publisher = RunPublisher(owner.identity, owner.dht, "dandelion", tmp_path / "runs")
        joined = (await publisher.publish(run_toml(name="joined"))).run
        async with runs_service(node, tmp_path, run=joined) as service:
            get = service.ctx.handlers["runconfig.get"]
            stranger = Identity.generate().peer_id_bytes
            for i in range(MAX_WATCHED_RUNS + 4):
                with pytest.raises(ConfigError, match="no config"):
                    await get({"run": derive_run_id(stranger, f"ghost{i}")})
            assert list(service.watchers) == [joined]

            others = [(await publisher.publish(run_toml(name=f"r{i}"))).run
                      for i in range(MAX_WATCHED_RUNS)]
            for run in others:
                assert (await get({"run": run}))["run"] == run
            # The joined run stays; the least recently used other run made room.
            assert len(service.watchers) == MAX_WATCHED_RUNS
            assert joined in service.watchers and others[0] not in service.watchers
            assert set(others[1:]) <= set(service.watchers)
            assert others[0] not in service._watch_scopes
            assert (await get({"run": others[0]}))["version"] == 1
            assert others[0] in service.watchers and others[1] not in service.watchers


async def test_fetch_checks_the_size_and_blames_no_holder_for_a_wrong_one(tmp_path: Path) -> None:
    async with swarm(2) as (owner, node):
        run = derive_run_id(owner.identity.peer_id_bytes, "tiny")
        data_dir, manifest = packed_dataset(tmp_path, owner.identity)
        book = (await serve_dataset(owner, run, manifest, data_dir,
                                    tmp_path / "leases.sqlite")).book
        try:
            async with runs_service(node, tmp_path, run=run) as service:
                fetch = service.ctx.handlers["dataset.fetch"]
                chunk = manifest.chunks[0]
                for size in (0, -1, True, MAX_CHUNK_BYTES + 1, 1.5, "big"):
                    with pytest.raises(ConfigError, match="'size'"):
                        await fetch({"chunk": chunk.hash, "size": size})
                with pytest.raises(PeerUnavailable):
                    await fetch({"chunk": chunk.hash, "size": chunk.size - 1})
                assert node.violations.get(owner.peer_id.to_base58(), 0) == 0
                got = await fetch({"chunk": chunk.hash, "size": chunk.size})
                assert Path(got["path"]).stat().st_size == chunk.size
        finally:
            book.close()


async def test_leases_follow_the_manifest_the_run_config_names(tmp_path: Path) -> None:
    async with swarm(3) as (owner, hostile, node):
        assert owner.dht is not None
        run = derive_run_id(owner.identity.peer_id_bytes, "tiny")
        data_dir, manifest = packed_dataset(tmp_path / "honest", owner.identity)
        hostile_dir, hostile_manifest = packed_dataset(tmp_path / "hostile", hostile.identity)
        digest = signed_digest(signed_document(data_dir))
        books = [
            (await serve_dataset(who, run, signed, where, tmp_path / f"leases-{i}.sqlite")).book
            for i, (who, where, signed) in enumerate(((owner, data_dir, manifest),
                                                      (hostile, hostile_dir, hostile_manifest)))
        ]
        await RunPublisher(owner.identity, owner.dht, "dandelion", tmp_path / "runs").publish(
            run_toml() + f'manifest = "{digest}"\n')
        try:
            async with runs_service(node, tmp_path, run=run) as service:
                lease = service.ctx.handlers["dataset.lease"]
                for _ in range(2):
                    await lease({})
                client = service.clients[run]
                assert client.manifest == manifest and client.expected_manifest == digest
                assert {client.granted_by(g) for _, g, _ in service._leases.values()} == {
                    owner.identity.peer_id_bytes}
        finally:
            for book in books:
                book.close()
