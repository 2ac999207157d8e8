"""A run's config published in the DHT reaches every peer; a forger's is ignored and logged.
Each version after the first applies from a global step the owner chooses, on a round
boundary."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import trio

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.directory import list_runs
from dandelion_p2p.runconfig.publication import (
    CONFIG_NAMESPACE,
    encode_value,
    sign_config,
)
from dandelion_p2p.runconfig.publisher import RunPublisher
from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.runconfig.watcher import RunConfigWatcher
from dandelion_p2p.sync.progress import swarm_checkpoint_step
from dandelion_p2p.sync.statesync import StateServer
from dandelion_p2p.worker.checkpoint import CheckpointStore
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
            watchers.append(RunConfigWatcher(run, node.dht, poll_interval=0.2))
        async with trio.open_nursery() as nursery:
            for watcher in watchers:
                nursery.start_soon(watcher.run_forever)
            with trio.fail_after(15):
                for watcher in watchers:
                    assert (await watcher.changed(0)).version == 1

            # Mid-run, the owner raises the learning rate. With no step asked for, and no
            # peer training yet, it applies a checkpoint interval (500) and two rounds (of 50)
            # after step 0.
            async def swarm_step(asked: str, config: RunConfig) -> int:
                return await swarm_checkpoint_step(owner, asked, timeout=2.0)

            second = await publisher.publish(run_toml(lr=3e-4), swarm_step=swarm_step)
            assert (second.run, second.version, second.effective_step) == (run, 2, 600)
            with trio.fail_after(15):
                for watcher in watchers:
                    newest = await watcher.changed(1)
                    assert (newest.version, newest.effective_step) == (2, 600)
                    assert newest.config.optimizer.lr == pytest.approx(3e-4)

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


async def test_a_version_applies_from_a_round_boundary_and_keeps_the_runs_model(
    tmp_path: Path,
) -> None:
    async with swarm(2) as nodes:
        owner = nodes[0]
        assert owner.dht is not None
        publisher = RunPublisher(owner.identity, owner.dht, "dandelion", tmp_path / "runs")
        with pytest.raises(ConfigError, match="first version"):
            await publisher.publish(run_toml(), at_step=100)
        assert (await publisher.publish(run_toml())).effective_step == 0
        # Rounds of version 1 end every 50 steps: step 120 is inside one.
        second = await publisher.publish(run_toml(lr=2e-4), at_step=120)
        assert (second.version, second.effective_step) == (2, 150)
        with pytest.raises(ConfigError, match=r"model\.base"):
            await publisher.publish(run_toml(lr=2e-4).replace("tiny-sd", "another-model"),
                                    at_step=400)
        again = await RunPublisher(owner.identity, owner.dht, "dandelion",
                                   tmp_path / "runs").publish(run_toml(lr=2e-4),
                                                              only_if_changed=True)
        assert (again.version, again.effective_step) == (2, 150)


async def test_by_default_a_version_applies_a_few_rounds_after_the_swarms_step(
    tmp_path: Path,
) -> None:
    async with swarm(3) as nodes:
        owner = nodes[0]
        assert owner.dht is not None
        publisher = RunPublisher(owner.identity, owner.dht, "dandelion", tmp_path / "runs")
        run = (await publisher.publish(run_toml())).run
        for node, step in zip(nodes[1:], (1230, 1234), strict=True):
            folder = tmp_path / node.peer_id.to_base58()
            CheckpointStore(folder, keep_last=1).save(
                step, {}, {"trainable": {"w": torch.zeros(4)}}, {"optimizer": {}})
            StateServer(node.host, lambda: run, lambda folder=folder: folder).install()
        assert await swarm_checkpoint_step(owner, run) == 1234
        assert await swarm_checkpoint_step(owner, run + "x") == -1

        async def swarm_step(asked: str, config: RunConfig) -> int:
            return await swarm_checkpoint_step(owner, asked)

        second = await publisher.publish(run_toml(lr=2e-4), swarm_step=swarm_step)
        # 1234 plus a checkpoint interval (500) and two rounds of 50, on a round boundary.
        assert (second.version, second.effective_step) == (2, 1850)
