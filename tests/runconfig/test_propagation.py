"""A run's config published in the DHT reaches every peer; a forger's is ignored and logged."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from dandelion_p2p.runconfig.directory import list_runs
from dandelion_p2p.runconfig.publication import (
    CONFIG_NAMESPACE,
    encode_value,
    sign_config,
)
from dandelion_p2p.runconfig.publisher import RunPublisher
from dandelion_p2p.runconfig.watcher import ConfigApplier, RunConfigWatcher
from tests.dataset.helpers import run_toml
from tests.swarm import swarm


async def test_a_new_version_reaches_every_peer_and_a_forgery_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dandelion_p2p.runconfig.watcher")
    async with swarm(4) as nodes:
        owner, forger = nodes[0], nodes[3]
        assert owner.dht is not None and forger.dht is not None
        publisher = RunPublisher(owner.identity, owner.dht, "dandelion", tmp_path / "runs")
        first = await publisher.publish(run_toml(lr=1e-4))
        assert first.version == 1 and first.stored_on >= 1
        run = first.run

        watchers = []
        for node in nodes:
            assert node.dht is not None
            watchers.append(RunConfigWatcher(run, node.dht.get, poll_interval=0.2))
        async with trio.open_nursery() as nursery:
            for watcher in watchers:
                nursery.start_soon(watcher.run_forever)
            with trio.fail_after(15):
                for watcher in watchers:
                    assert (await watcher.changed(0)).version == 1
            appliers = [ConfigApplier(w) for w in watchers]

            # Mid-run, the owner raises the learning rate.
            second = await publisher.publish(run_toml(lr=3e-4))
            assert (second.run, second.version) == (run, 2)
            with trio.fail_after(15):
                for watcher in watchers:
                    newest = await watcher.changed(1)
                    assert newest.version == 2
                    assert newest.config.optimizer.lr == pytest.approx(3e-4)
            for applier in appliers:
                assert applier.applied is not None and applier.applied.version == 1
                applied = applier.at_sync_boundary()
                assert applied is not None and applied.version == 2
                assert applier.at_sync_boundary() is None

            # A forger publishes, under the owner's run, a config signed by its own key.
            forged = sign_config(forger.identity, "tiny", 99, run_toml(lr=0.9))
            stored = await forger.dht.put(CONFIG_NAMESPACE, run.encode(), encode_value(forged),
                                          60.0, keep=False)
            assert stored >= 1
            forger_id = forger.peer_id.to_base58()
            with trio.fail_after(15):
                while not all(w.ignored_count for w in watchers[:3]):
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

        for watcher in watchers:
            current = watcher.current()
            assert current is not None and current.version == 2
            assert current.owner == owner.peer_id.to_base58()
        ignored = [r for r in caplog.records if "ignored config version 99" in r.getMessage()]
        assert ignored and all(forger_id in r.getMessage() for r in ignored)
        assert all(r.levelno == logging.WARNING for r in ignored)

        listed = await list_runs(nodes[2].dht, "dandelion")  # type: ignore[arg-type]
        assert [(r.run, r.version, r.model) for r in listed] == [(run, 2, "tiny-sd")]


async def test_a_restarted_owner_keeps_counting_versions(tmp_path: Path) -> None:
    async with swarm(2) as nodes:
        owner = nodes[0]
        assert owner.dht is not None
        state = tmp_path / "runs"
        first = await RunPublisher(owner.identity, owner.dht, "dandelion", state).publish(
            run_toml())
        again = await RunPublisher(owner.identity, owner.dht, "dandelion", state).publish(
            run_toml(), only_if_changed=True)
        assert again.version == first.version == 1
        changed = await RunPublisher(owner.identity, owner.dht, "dandelion",
                                     tmp_path / "lost-state").publish(run_toml(lr=2e-4))
        assert changed.version == 2
