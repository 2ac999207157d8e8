"""An owner restarted from its data dir keeps listing every run it published."""

from __future__ import annotations

from pathlib import Path

from dandelion_p2p.runconfig.directory import list_runs
from dandelion_p2p.runconfig.publisher import RunPublisher
from tests.dataset.helpers import run_toml
from tests.swarm import swarm


async def test_publishing_after_a_restart_keeps_the_earlier_runs_listed(tmp_path: Path) -> None:
    async with swarm(2) as (owner, peer):
        assert owner.dht is not None and peer.dht is not None
        state = tmp_path / "runs"
        first = await RunPublisher(owner.identity, owner.dht, "dandelion", state).publish(
            run_toml(name="alpha"))
        (state / "broken-000000000000000000000000.json").write_text("{not json")

        restarted = RunPublisher(owner.identity, owner.dht, "dandelion", state)
        assert set(restarted.listings) == {first.run}
        listed_at = restarted.listings[first.run].updated_at_ms
        second = await restarted.publish(run_toml(name="beta"))

        runs = {r.run: r for r in await list_runs(peer.dht, "dandelion")}
        assert set(runs) == {first.run, second.run}
        assert runs[first.run].version == 1
        assert runs[first.run].updated_at_ms == listed_at  # when it was published, not now
