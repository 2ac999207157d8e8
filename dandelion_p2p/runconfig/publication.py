"""Run ids and the signed values a run owner publishes in the DHT (spec: protocol/runconfig.md).

A run id is ``<name>-<24 hex digits>``, the digits taken from a hash of the owner's peer id and
the run name: nobody without the owner's key can produce a valid config for the run, because
every published value carries the owner's signature and the id must derive from that owner.

Two namespaces:

* ``runcfg``, key the run id: a ``SignedRunConfig`` (the TOML text, versioned, and the global
  step from which the version applies). Values of the first format (``SignedRunConfigV1``, no
  such step) are still read, as applying from step 0.
* ``runs``, key the network name: one ``RunListings`` per owner (each run in it a signed
  ``RunListing``), so a peer can list the runs of its swarm without reading every config.

DHT servers check a value's own signature and its run id; the watcher checks again (and that
the value belongs to the key it asked for) and parses the TOML, which servers leave alone so
that a newer schema does not make older servers refuse configs.
"""

from __future__ import annotations

import re
import time

import blake3

from dandelion_p2p.errors import ConfigError, ProtocolViolation
from dandelion_p2p.identity import MAX_PEER_ID_SIZE, Identity, PeerId, verify_by_peer
from dandelion_p2p.net.dht.messages import MAX_VALUE
from dandelion_p2p.net.dht.records import NamespacePolicy, RecordValidator
from dandelion_p2p.wire import Message, Registry, RejectCode, decode, encode, invalid
from dandelion_p2p.wire.signed import SignedMessage

RUNCONFIG = Registry("runconfig")

CONFIG_NAMESPACE = "runcfg"
RUNS_NAMESPACE = "runs"
CONFIG_SIGNING_DOMAIN_V1 = b"dandelion/runconfig/v1"
CONFIG_SIGNING_DOMAIN = b"dandelion/runconfig/v2"
MAX_STEP = 2**53
LISTING_SIGNING_DOMAIN = b"dandelion/runlisting/v1"
RUN_ID_HASH_HEX = 24
RECORD_TTL = 3600.0
MAX_RECORD_TTL_MS = 2 * 3_600_000
# The config and its envelope must fit one DHT value.
MAX_TOML_BYTES = MAX_VALUE - 1024
_RUN_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_RUN_ID = re.compile(r"([a-z0-9][a-z0-9._-]{0,63})-([0-9a-f]{24})")


def derive_run_id(owner: bytes, name: str) -> str:
    """The run id of run ``name`` owned by the peer id ``owner`` (binary)."""
    if not _RUN_NAME.fullmatch(name):
        raise ConfigError(f"run name {name!r}: 1-64 of a-z, 0-9, '.', '_', '-'")
    digest = blake3.blake3(b"dandelion/run/v1\x00" + owner + b"\x00" + name.encode()).hexdigest()
    return f"{name}-{digest[:RUN_ID_HASH_HEX]}"


def run_name_of(run_id: str) -> str:
    """The name part of a run id; raises ``ConfigError`` for a string that is not one."""
    match = _RUN_ID.fullmatch(run_id)
    if match is None:
        raise ConfigError(f"{run_id!r} is not a run id (<name>-<24 hex digits>)")
    return match.group(1)


def is_run_id(text: str) -> bool:
    return _RUN_ID.fullmatch(text) is not None


def _check_owner_fields(run: str, name: str, owner: bytes, where: str) -> None:
    if not 2 <= len(owner) <= MAX_PEER_ID_SIZE:
        raise invalid(f"{where}.owner: not a peer id")
    if not _RUN_NAME.fullmatch(name):
        raise invalid(f"{where}.name: not a run name")
    if not _RUN_ID.fullmatch(run):
        raise invalid(f"{where}.run: not a run id")


def _check_config(config: SignedRunConfig | SignedRunConfigV1) -> None:
    """The rules both config formats share (every field but the V2 ``effective_step``)."""
    _check_owner_fields(config.run, config.name, config.owner, "SignedRunConfig")
    if not 1 <= config.version < 2**63:
        raise invalid("SignedRunConfig.version must be >= 1")
    if len(config.toml.encode()) > MAX_TOML_BYTES:
        raise invalid(f"SignedRunConfig.toml: over {MAX_TOML_BYTES} bytes")
    if not 0 <= config.published_at_ms < 2**53:
        raise invalid("SignedRunConfig.published_at_ms out of range")
    if len(config.signature) > 64:
        raise invalid("SignedRunConfig.signature longer than 64 bytes")


# The two config formats cannot share one field declaration: the signed bytes follow the
# declaration order, and V2 signs ``effective_step`` between ``version`` and ``toml``.
@RUNCONFIG.message(1)
class SignedRunConfigV1(SignedMessage):
    """Version ``version`` of run ``run``'s config in the first format: no effective step, so
    readers take it as applying from global step 0. Read, never written."""

    SIGNING_DOMAIN = CONFIG_SIGNING_DOMAIN_V1

    run: str
    name: str
    owner: bytes
    version: int
    toml: str
    published_at_ms: int
    signature: bytes

    def check(self) -> None:
        _check_config(self)

    @property
    def effective_step(self) -> int:
        return 0


@RUNCONFIG.message(4)
class SignedRunConfig(SignedMessage):
    """Version ``version`` of run ``run``'s config, in force from global step
    ``effective_step``, signed by its owner."""

    SIGNING_DOMAIN = CONFIG_SIGNING_DOMAIN

    run: str
    name: str
    owner: bytes
    version: int
    effective_step: int
    toml: str
    published_at_ms: int
    signature: bytes

    def check(self) -> None:
        _check_config(self)
        if not 0 <= self.effective_step < MAX_STEP:
            raise invalid("SignedRunConfig.effective_step out of range")

    @property
    def owner_b58(self) -> str:
        return PeerId(self.owner).to_base58()


@RUNCONFIG.message(2)
class RunListing(SignedMessage):
    """What ``runs`` shows about a run: enough to choose one to join, signed by its owner."""

    SIGNING_DOMAIN = LISTING_SIGNING_DOMAIN

    run: str
    name: str
    owner: bytes
    version: int
    model: str
    updated_at_ms: int
    signature: bytes

    def check(self) -> None:
        _check_owner_fields(self.run, self.name, self.owner, "RunListing")
        if not 1 <= self.version < 2**63:
            raise invalid("RunListing.version must be >= 1")
        if len(self.model) > 512:
            raise invalid("RunListing.model longer than 512 characters")
        if not 0 <= self.updated_at_ms < 2**53:
            raise invalid("RunListing.updated_at_ms out of range")
        if len(self.signature) > 64:
            raise invalid("RunListing.signature longer than 64 bytes")

    def to_json(self) -> dict[str, object]:
        return {
            "run": self.run,
            "name": self.name,
            "owner": PeerId(self.owner).to_base58(),
            "version": self.version,
            "model": self.model,
            "updated_at": self.updated_at_ms / 1000,
        }


MAX_LISTED_RUNS = 16


@RUNCONFIG.message(3)
class RunListings(Message):
    """Every run one owner lists in a network: one record per owner under the network's key."""

    runs: tuple[RunListing, ...]

    def check(self) -> None:
        if len(self.runs) > MAX_LISTED_RUNS:
            raise invalid(f"RunListings: more than {MAX_LISTED_RUNS} runs")
        if len({r.run for r in self.runs}) != len(self.runs):
            raise invalid("RunListings: a run is listed twice")


def sign_config(
    identity: Identity, name: str, version: int, toml: str, *, effective_step: int = 0,
    published_at_ms: int | None = None
) -> SignedRunConfig:
    owner = identity.peer_id_bytes
    unsigned = SignedRunConfig(
        run=derive_run_id(owner, name),
        name=name,
        owner=owner,
        version=version,
        effective_step=effective_step,
        toml=toml,
        published_at_ms=(
            int(time.time() * 1000) if published_at_ms is None else published_at_ms
        ),
        signature=b"",
    )
    return unsigned.signed_with(identity.sign)


def sign_listing(identity: Identity, config: SignedRunConfig, model: str) -> RunListing:
    unsigned = RunListing(
        run=config.run,
        name=config.name,
        owner=config.owner,
        version=config.version,
        model=model[:512],
        updated_at_ms=config.published_at_ms,
        signature=b"",
    )
    return unsigned.signed_with(identity.sign)


def verify_owned(value: SignedRunConfig | SignedRunConfigV1 | RunListing) -> None:
    """Raises ``ProtocolViolation`` unless the run id derives from the signer, who signed it."""
    try:
        expected = derive_run_id(value.owner, value.name)
    except ConfigError:
        raise ProtocolViolation(RejectCode.INVALID_FIELD, "bad run name") from None
    if value.run != expected:
        raise ProtocolViolation(
            RejectCode.FORBIDDEN, f"run {value.run} does not belong to the signing key"
        )
    if not verify_by_peer(value.owner, value.signed_bytes(), value.signature):
        raise ProtocolViolation(RejectCode.BAD_SIGNATURE, "not signed by the run's owner")


def decode_config(value: bytes) -> SignedRunConfig | SignedRunConfigV1:
    """Decode and verify a ``runcfg`` value (either format); raises ``ProtocolViolation``."""
    msg = decode(value, RUNCONFIG)
    if not isinstance(msg, SignedRunConfig | SignedRunConfigV1):
        raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "value is not a SignedRunConfig")
    verify_owned(msg)
    return msg


def decode_listings(value: bytes) -> RunListings:
    """Decode and verify a ``runs`` value: every listed run signed by its owner."""
    msg = decode(value, RUNCONFIG)
    if not isinstance(msg, RunListings):
        raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "value is not a RunListings")
    for listing in msg.runs:
        verify_owned(listing)
    return msg


def encode_value(msg: Message) -> bytes:
    data = encode(msg)
    if len(data) > MAX_VALUE:
        raise ConfigError(f"run config of {len(data)} bytes does not fit a DHT record")
    return data


def register_namespaces(validator: RecordValidator) -> None:
    validator.register(
        CONFIG_NAMESPACE,
        NamespacePolicy(
            max_ttl_ms=MAX_RECORD_TTL_MS, check_value=lambda v: _ignore(decode_config(v))
        ),
    )
    validator.register(
        RUNS_NAMESPACE,
        NamespacePolicy(
            max_ttl_ms=MAX_RECORD_TTL_MS, check_value=lambda v: _ignore(decode_listings(v))
        ),
    )


def _ignore(_: object) -> None:
    return None
