"""Which run config version is in force at which global step, and what a version may change
(no network): the rule every peer applies on its own and still agrees on."""

from __future__ import annotations

import dataclasses
import time

import pytest

from dandelion_p2p.averaging.matchmaking import group_run_key
from dandelion_p2p.errors import ConfigError, ProtocolViolation
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht.records import sign_record
from dandelion_p2p.runconfig.publication import (
    CONFIG_NAMESPACE,
    CONFIG_SIGNING_DOMAIN_V1,
    SignedRunConfigV1,
    decode_config,
    derive_run_id,
    encode_value,
    sign_config,
)
from dandelion_p2p.runconfig.schema import loads
from dandelion_p2p.runconfig.timeline import (
    ConfigTimeline,
    fixed_changes,
    round_up_to,
)
from dandelion_p2p.runconfig.watcher import select_newest
from dandelion_p2p.sync.statesync_core import robust_step
from dandelion_p2p.wire import RejectCode
from dandelion_p2p.worker.protocol import (
    MAX_RUN_CONFIGS,
    ConfigVersion,
    decode_run_configs,
    encode_run_configs,
    round_config,
)
from tests.dataset.helpers import run_toml


def version(number: int, effective_step: int, lr: float = 1e-4, **extra: str) -> ConfigVersion:
    toml = run_toml(lr=lr) + "".join(f"{line}\n" for line in extra.values())
    return ConfigVersion(number, effective_step, toml, loads(toml))


def test_the_newest_version_effective_at_a_rounds_first_step_is_in_force() -> None:
    timeline: ConfigTimeline[ConfigVersion] = ConfigTimeline()
    for v in (version(1, 0), version(2, 300, lr=2e-4), version(3, 200, lr=3e-4)):
        assert timeline.add(v) is None
    in_force = {step: timeline.in_force(step).version  # type: ignore[union-attr]
                for step in (0, 199, 200, 299, 300, 10_000)}
    # Version 3 was published after 2 and applies earlier: from step 200 it overrides 2 for
    # good, so version 2 is never in force.
    assert in_force == {0: 1, 199: 1, 200: 3, 299: 3, 300: 3, 10_000: 3}
    assert [v.version for v in timeline.newer_than(1)] == [2, 3]
    assert timeline.newest().version == 3  # type: ignore[union-attr]


def test_a_peer_missing_a_version_lands_in_another_group() -> None:
    informed: ConfigTimeline[ConfigVersion] = ConfigTimeline()
    late: ConfigTimeline[ConfigVersion] = ConfigTimeline()
    for timeline in (informed, late):
        timeline.add(version(1, 0))
    informed.add(version(2, 50, lr=5e-4))
    run = derive_run_id(Identity.generate().peer_id_bytes, "tiny")

    def key(timeline: ConfigTimeline[ConfigVersion], step: int) -> bytes:
        in_force = timeline.in_force(step)
        assert in_force is not None
        return group_run_key(run, in_force.version)

    assert key(informed, 0) == key(late, 0)
    assert key(informed, 50) != key(late, 50), "different versions never share a group"
    late.add(version(2, 50, lr=5e-4))
    assert key(informed, 50) == key(late, 50)
    assert len(group_run_key("x" * 64 + "-" + "0" * 24, 2**63 - 1)) == 32


def test_a_peer_that_knows_only_a_pending_version_trains_under_it() -> None:
    timeline: ConfigTimeline[ConfigVersion] = ConfigTimeline()
    assert timeline.in_force(5) is None
    timeline.add(version(4, 600, lr=2e-4))
    assert timeline.in_force(5).version == 4  # type: ignore[union-attr]


def test_a_version_changing_what_a_running_run_cannot_change_is_refused() -> None:
    timeline: ConfigTimeline[ConfigVersion] = ConfigTimeline()
    timeline.add(version(1, 0))
    reason = timeline.add(version(2, 100, training="[training]\nresolution = 256"))
    assert reason is not None and "training.resolution" in reason
    assert timeline.get(2) is None and timeline.in_force(100).version == 1  # type: ignore[union-attr]
    assert timeline.add(version(3, 100, lr=5e-4, sync="[sync]\nlocal_steps = 20")) is None
    # Refused also when it arrives after a newer version it differs from.
    assert timeline.add(version(2, 50, training="[training]\nbatch_size = 8")) is not None

    old = loads(run_toml())
    assert fixed_changes(old, loads(run_toml(lr=0.5))) == []
    assert fixed_changes(old, loads(run_toml().replace("tiny-sd", "other"))) == ["model.base"]
    # Unset and the mode's own value are one setting; the other value is a change.
    assert fixed_changes(old, loads(run_toml() + "[sync]\noverlap = true\n")) == []
    assert fixed_changes(old, loads(run_toml() + "[sync]\noverlap = false\n")) == [
        "sync.overlap"]


def test_a_timeline_keeps_the_newest_versions_and_the_first_text_of_each() -> None:
    timeline: ConfigTimeline[ConfigVersion] = ConfigTimeline(limit=3)
    for n in range(1, 6):
        timeline.add(version(n, 10 * n))
    assert [v.version for v in timeline] == [3, 4, 5]
    timeline.add(version(5, 0, lr=0.5))
    assert timeline.get(5).effective_step == 50  # type: ignore[union-attr]
    assert [round_up_to(s, 50) for s in (0, 1, 50, 51)] == [0, 50, 50, 100]


def test_the_effective_step_is_signed_and_the_first_format_still_reads() -> None:
    owner = Identity.generate()
    signed = sign_config(owner, "tiny", 2, run_toml(), effective_step=150)
    assert decode_config(encode_value(signed)).effective_step == 150
    moved = dataclasses.replace(signed, effective_step=10)
    with pytest.raises(ProtocolViolation) as exc:
        decode_config(encode_value(moved))
    assert exc.value.code == RejectCode.BAD_SIGNATURE

    unsigned = SignedRunConfigV1(run=signed.run, name="tiny", owner=owner.peer_id_bytes,
                                 version=1, toml=run_toml(), published_at_ms=1, signature=b"")
    assert CONFIG_SIGNING_DOMAIN_V1 in unsigned.signed_bytes()
    first = dataclasses.replace(unsigned, signature=owner.sign(unsigned.signed_bytes()))
    records = [sign_record(owner, CONFIG_NAMESPACE, signed.run.encode(), encode_value(value),
                           seq=1, expires_at_ms=int(time.time() * 1000) + 60_000)
               for value in (first, signed)]
    found, ignored = select_newest(signed.run, records[:1])
    assert found is not None and (found.version, found.effective_step) == (1, 0) and not ignored
    found, _ = select_newest(signed.run, records)
    assert found is not None and (found.version, found.effective_step) == (2, 150)
    assert found.to_json()["effective_step"] == 150


def test_the_worker_protocol_bounds_and_checks_config_versions() -> None:
    entries = [version(n, n) for n in range(1, 12)]
    wire = encode_run_configs(reversed(entries))
    assert [e["version"] for e in wire] == list(range(12 - MAX_RUN_CONFIGS, 12))
    assert decode_run_configs(wire)[0].config.optimizer.lr == pytest.approx(1e-4)
    bad = [
        wire + wire[:1],
        [{**wire[0], "extra": 1}],
        [{**wire[0], "version": True}],
        [{**wire[0], "effective_step": -1}],
        [{**wire[0], "toml": "x" * 70_000}],
        [{**wire[0], "toml": "name = "}],
        {"version": 1},
    ]
    for value in bad:
        with pytest.raises(ConfigError):
            decode_run_configs(value)
    assert round_config({"config_version": 2, "step": 30, "known_version": 3}) == (2, 30, 3)
    for params in ({"step": 30, "known_version": 3},
                   {"config_version": 2, "step": 2.5, "known_version": 3},
                   {"config_version": 2, "step": 2**53, "known_version": 3}):
        with pytest.raises(ConfigError):
            round_config(params)


def test_two_texts_under_one_version_number_never_share_a_group() -> None:
    run = derive_run_id(Identity.generate().peer_id_bytes, "tiny")
    one, other = version(2, 50, lr=5e-4), version(2, 50, lr=1e-3)
    assert group_run_key(run, 2, one.toml) != group_run_key(run, 2, other.toml)
    assert group_run_key(run, 2, one.toml) == group_run_key(run, 2, version(2, 50,
                                                                           lr=5e-4).toml)


def test_one_peer_claiming_a_huge_step_does_not_set_the_swarms_step() -> None:
    assert robust_step([]) == -1
    assert robust_step([120]) == 120
    assert robust_step([120, 2**52, 118]) == 120
    assert robust_step([100, 120, 2**52, 118]) == 120
