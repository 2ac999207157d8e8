"""Run ids, signed config values and how DHT servers and watchers judge them (no network)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import msgpack
import pytest

from dandelion_p2p.errors import ConfigError, ProtocolViolation
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht.records import RecordValidator, sign_record
from dandelion_p2p.runconfig.publication import (
    CONFIG_NAMESPACE,
    RUNS_NAMESPACE,
    RunListing,
    RunListings,
    SignedRunConfig,
    SignedRunConfigV1,
    decode_config,
    derive_run_id,
    encode_value,
    is_run_id,
    register_namespaces,
    run_name_of,
    sign_config,
    sign_listing,
)
from dandelion_p2p.runconfig.schema import RunConfig, loads
from dandelion_p2p.runconfig.watcher import select_newest
from dandelion_p2p.wire import RejectCode
from tests.dataset.helpers import run_toml

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "example-run.toml"


def test_the_documented_example_run_config_loads() -> None:
    config = loads(EXAMPLE.read_text())
    assert isinstance(config, RunConfig)
    assert loads(config.to_toml()) == config
    assert config.dataset.lease_seconds > 0


def test_schema_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        loads(run_toml(lr=5.0))
    with pytest.raises(ConfigError, match=r"dataset\.'lease_secs'.*lease_seconds"):
        loads('name = "x"\n[model]\nbase = "m"\n[dataset]\nlease_secs = 3\n')


def test_run_ids_derive_from_owner_and_name() -> None:
    a, b = Identity.generate(), Identity.generate()
    run = derive_run_id(a.peer_id_bytes, "tiny")
    assert is_run_id(run) and run_name_of(run) == "tiny"
    assert run == derive_run_id(a.peer_id_bytes, "tiny")
    assert run != derive_run_id(b.peer_id_bytes, "tiny")
    assert run != derive_run_id(a.peer_id_bytes, "tiny2")
    with pytest.raises(ConfigError):
        derive_run_id(a.peer_id_bytes, "../etc")


def _record(identity: Identity, key: bytes, value: bytes, namespace: str = CONFIG_NAMESPACE):
    return sign_record(identity, namespace, key, value, seq=1,
                       expires_at_ms=int(time.time() * 1000) + 60_000)


def test_dht_servers_refuse_configs_not_signed_by_the_runs_owner() -> None:
    owner, forger = Identity.generate(), Identity.generate()
    validator = RecordValidator()
    register_namespaces(validator)
    now = int(time.time() * 1000)
    good = sign_config(owner, "tiny", 1, run_toml())
    key = good.run.encode()
    validator.validate(_record(owner, key, encode_value(good)), now)

    # The forger signs a config claiming the owner's run...
    claims_run = dataclasses.replace(good, owner=forger.peer_id_bytes, signature=b"")
    claims_run = claims_run.signed_with(forger.sign)
    # ... or keeps the owner's name in the value but signs it itself.
    owner_named = dataclasses.replace(good, version=9, signature=b"")
    owner_named = owner_named.signed_with(forger.sign)
    for forged, code in ((claims_run, RejectCode.FORBIDDEN),
                         (owner_named, RejectCode.BAD_SIGNATURE)):
        with pytest.raises(ProtocolViolation) as exc:
            validator.validate(_record(forger, key, encode_value(forged)), now)
        assert exc.value.code == code
        with pytest.raises(ProtocolViolation):
            decode_config(encode_value(forged))


def test_newest_owned_version_wins_and_the_rest_is_explained() -> None:
    owner, forger = Identity.generate(), Identity.generate()
    v1 = sign_config(owner, "tiny", 1, run_toml(lr=1e-4))
    v2 = sign_config(owner, "tiny", 2, run_toml(lr=3e-4))
    bad_toml = sign_config(owner, "tiny", 3, 'name = "tiny"\n[model]\nbase = ""\n')
    foreign = sign_config(forger, "tiny", 7, run_toml(lr=0.5))
    key = v1.run.encode()
    records = [_record(owner, key, encode_value(v)) for v in (v2, v1, bad_toml)]
    records.append(_record(forger, key, encode_value(foreign)))
    found, ignored = select_newest(v1.run, records)
    assert found is not None and found.version == 2
    assert found.config.optimizer.lr == pytest.approx(3e-4)
    reasons = {i.version: i.reason for i in ignored}
    assert "model.base" in reasons[3]
    assert forger.peer_id.to_base58() in reasons[7] and "does not own" in reasons[7]


def test_listings_are_signed_per_run() -> None:
    owner, forger = Identity.generate(), Identity.generate()
    validator = RecordValidator()
    register_namespaces(validator)
    config = sign_config(owner, "tiny", 1, run_toml())
    listing = sign_listing(owner, config, "tiny-sd")
    value = encode_value(RunListings(runs=(listing,)))
    validator.validate(_record(owner, b"dandelion", value, RUNS_NAMESPACE),
                       int(time.time() * 1000))
    stolen = dataclasses.replace(listing, model="evil", signature=b"")
    stolen = stolen.signed_with(forger.sign)
    with pytest.raises(ProtocolViolation):
        validator.validate(
            _record(forger, b"dandelion", encode_value(RunListings(runs=(stolen,))),
                    RUNS_NAMESPACE),
            int(time.time() * 1000),
        )


def test_signed_bytes_are_those_the_spec_lists() -> None:
    """protocol/runconfig.md pins each signed array; the declared fields must produce it."""
    owner = b"\x00\x24" + bytes(range(36))
    run = derive_run_id(owner, "tiny")
    config = SignedRunConfig(run=run, name="tiny", owner=owner, version=3, effective_step=150,
                             toml="x = 1", published_at_ms=7, signature=b"s")
    assert config.signed_bytes() == msgpack.packb(
        [b"dandelion/runconfig/v2", run, "tiny", owner, 3, 150, "x = 1", 7], use_bin_type=True
    )
    first = SignedRunConfigV1(run=run, name="tiny", owner=owner, version=3, toml="x = 1",
                              published_at_ms=7, signature=b"s")
    assert first.signed_bytes() == msgpack.packb(
        [b"dandelion/runconfig/v1", run, "tiny", owner, 3, "x = 1", 7], use_bin_type=True
    )
    listing = RunListing(run=run, name="tiny", owner=owner, version=3, model="sd",
                         updated_at_ms=7, signature=b"s")
    assert listing.signed_bytes() == msgpack.packb(
        [b"dandelion/runlisting/v1", run, "tiny", owner, 3, "sd", 7], use_bin_type=True
    )
