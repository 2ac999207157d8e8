"""Hostile run configs are refused with ConfigError and never end a watcher (no network)."""

from __future__ import annotations

import time

import pytest
import trio

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht.messages import SignedRecord
from dandelion_p2p.net.dht.records import sign_record
from dandelion_p2p.runconfig.publication import CONFIG_NAMESPACE, encode_value, sign_config
from dandelion_p2p.runconfig.schema import loads
from dandelion_p2p.runconfig.watcher import RunConfigWatcher, select_newest
from tests.dataset.helpers import run_toml

DEEP = "name = \"tiny\"\nx = " + "[" * 3000 + "]" * 3000 + "\n[model]\nbase = \"m\"\n"
HUGE = "9" * 400


@pytest.mark.parametrize(
    "text",
    [
        DEEP,
        run_toml().replace("max_leases_per_peer = 2", f"max_leases_per_peer = {HUGE}"),
        run_toml().replace("lr = 0.0001", f"lr = {HUGE}"),
        run_toml() + f"\n[training]\nseed = {2**63}\n",
        run_toml().replace("max_leases_per_peer = 2", f"max_leases_per_peer = -{2**63}"),
        'name = "tiny"\n[model]\nbase = "m"\nrevision = ' + "1" * 5000 + "\n",
    ],
    ids=["deep-arrays", "huge-int", "huge-int-as-float", "seed-2**63", "int-minus-2**63",
         "int-over-str-digit-limit"],
)
def test_hostile_configs_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        loads(text)


def test_integers_in_float_fields_and_near_the_bound_still_load() -> None:
    text = run_toml().replace("lr = 0.0001", "lr = 1") + f"\n[training]\nseed = {2**63 - 1}\n"
    config = loads(text)
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert config.training.seed == 2**63 - 1


def _record(identity: Identity, run: str, toml: str, version: int) -> SignedRecord:
    value = sign_config(identity, "tiny", version, toml)
    return sign_record(identity, CONFIG_NAMESPACE, run.encode(), encode_value(value), seq=version,
                       expires_at_ms=int(time.time() * 1000) + 60_000)


def test_a_deeply_nested_config_record_is_skipped_and_the_good_one_kept() -> None:
    owner = Identity.generate()
    good = sign_config(owner, "tiny", 1, run_toml())
    records = [_record(owner, good.run, run_toml(), 1),
               _record(owner, good.run, DEEP, 2)]
    found, ignored = select_newest(good.run, records)
    assert found is not None and found.version == 1
    assert [i.version for i in ignored] == [2]


async def test_a_failing_poll_does_not_end_the_watcher() -> None:
    owner = Identity.generate()
    good = sign_config(owner, "tiny", 1, run_toml())

    class FirstReadBreaks:
        """A record store whose first read breaks in an unforeseen way."""

        calls = 0

        async def get(
            self, namespace: str, key: bytes, *, timeout: float | None = None
        ) -> list[SignedRecord]:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("a read that breaks in an unforeseen way")
            return [_record(owner, good.run, run_toml(), 1)]

        async def put(self, namespace: str, key: bytes, value: bytes, ttl: float, *,
                      keep: bool = True, timeout: float | None = None) -> int:
            raise AssertionError("a watcher only reads")

        def held(self, namespace: str, key: bytes) -> list[SignedRecord] | None:
            raise AssertionError("a watcher reads through get")

        def landing(self, namespace: str, key: bytes) -> trio.Event:
            raise AssertionError("a watcher reads through get")

        async def prepare_put(self, namespace: str, key: bytes, *,
                              timeout: float | None = None) -> None:
            raise AssertionError("a watcher only reads")

        def unpublish(self, namespace: str, key: bytes) -> None:
            raise AssertionError("a watcher only reads")

    store = FirstReadBreaks()
    watcher = RunConfigWatcher(good.run, store, poll_interval=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run_forever)
        with trio.fail_after(5):
            found = await watcher.changed()
        nursery.cancel_scope.cancel()
    assert found.version == 1 and store.calls >= 2
