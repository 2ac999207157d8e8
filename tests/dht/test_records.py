"""Signed DHT records: signing, validation by namespace policy, the bounded store, merging."""

from __future__ import annotations

import dataclasses
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.announce import (
    MAX_TTL_MS,
    MEMBERS_NAMESPACE,
    PEER_NAMESPACE,
    PeerAnnouncement,
    encode_announcement,
    register_core_namespaces,
)
from dandelion_p2p.net.dht import records as records_module
from dandelion_p2p.net.dht.messages import (
    DHT,
    MAX_RECORD_KEY,
    MAX_VALUE,
    PutRecord,
    SignedRecord,
)
from dandelion_p2p.net.dht.records import (
    CLOCK_SKEW_MS,
    LocalRecordStore,
    NamespacePolicy,
    RecordValidator,
    merge_newest,
    routing_key,
    sign_record,
)
from dandelion_p2p.wire import WIRE_VERSION, RejectCode, decode, encode, invalid

NOW = 1_700_000_000_000
TTL_MS = 600_000
OPEN = "open"
OWNED = "owned"
CHECKED = "checked"

ALICE = Identity.from_seed(b"\x01" * 32)
BOB = Identity.from_seed(b"\x02" * 32)
CAROL = Identity.from_seed(b"\x03" * 32)


def only_digits(value: bytes) -> None:
    if not value.isdigit():
        raise invalid("value must be ASCII digits")


def make_validator() -> RecordValidator:
    validator = RecordValidator()
    validator.register(OPEN, NamespacePolicy(max_ttl_ms=TTL_MS))
    validator.register(OWNED, NamespacePolicy(max_ttl_ms=TTL_MS, owner_only=True))
    validator.register(CHECKED, NamespacePolicy(max_ttl_ms=TTL_MS, check_value=only_digits))
    return validator


def record(
    identity: Identity = ALICE,
    *,
    namespace: str = OPEN,
    key: bytes = b"k",
    value: bytes = b"v",
    seq: int = 1,
    expires_at_ms: int = NOW + TTL_MS,
) -> SignedRecord:
    return sign_record(identity, namespace, key, value, seq, expires_at_ms)


def rejected(validator: RecordValidator, rec: SignedRecord, now_ms: int = NOW) -> RejectCode:
    with pytest.raises(ProtocolViolation) as info:
        validator.validate(rec, now_ms)
    assert not validator.is_valid(rec, now_ms)
    return info.value.code


# ---- signing and validation ---------------------------------------------------------------


def test_signed_record_validates_and_survives_the_wire() -> None:
    validator = make_validator()
    rec = record(value=b"hello", seq=7)
    validator.validate(rec, NOW)
    assert validator.is_valid(rec, NOW)
    assert rec.publisher == ALICE.peer_id_bytes
    # What a peer receives is a decoded copy; its signature must still verify.
    received = decode(encode(PutRecord(record=rec)), DHT)
    assert isinstance(received, PutRecord)
    assert received.record == rec
    validator.validate(received.record, NOW)


def test_signed_bytes_and_signature_are_those_of_the_spec_example() -> None:
    """protocol/dht.md section 4.1, byte for byte."""
    identity = Identity.from_seed(bytes(range(32)))
    publisher = bytes.fromhex(
        "002408011220" "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    )
    assert identity.peer_id_bytes == publisher
    rec = sign_record(identity, "members", b"dandelion", b"\x01\x02", 5, 1_700_000_000_000)
    assert rec.signed_bytes() == (
        b"\x97\xc4\x13dandelion/record/v1\xa7members\xc4\x09dandelion\xc4\x02\x01\x02"
        + b"\xc4\x26" + publisher + b"\x05\xcf" + bytes.fromhex("0000018bcfe56800")
    )
    assert rec.signed_bytes() == msgpack.packb(
        [b"dandelion/record/v1", "members", b"dandelion", b"\x01\x02", publisher, 5,
         1_700_000_000_000],
        use_bin_type=True,
    )
    assert rec.signature.hex() == (
        "62d8e18dc47d39042d7e283dfa9c79694c463d9a392577434220c248752bcedab9c0cc35caea0ccb2706b043e"
        "542d4cf221ca38aa1aa46895217c3b20f659106"
    )
    assert routing_key("members", b"dandelion").hex() == (
        "28042396385b0411259338f7cbfa7d4bb749b56e61b8bcceb80f91a8988c1da4"
    )


def test_record_signed_by_one_key_but_claiming_another_publisher_is_bad_signature() -> None:
    mine = record(BOB)
    forged = dataclasses.replace(mine, publisher=ALICE.peer_id_bytes)
    assert rejected(make_validator(), forged) is RejectCode.BAD_SIGNATURE


def test_signature_from_another_record_does_not_transfer() -> None:
    other = record(ALICE, key=b"other")
    spliced = dataclasses.replace(record(ALICE), signature=other.signature)
    assert rejected(make_validator(), spliced) is RejectCode.BAD_SIGNATURE


@pytest.mark.parametrize(
    "change",
    [
        {"value": b"w"},
        {"seq": 2},
        {"expires_at_ms": NOW + TTL_MS - 1},
        {"key": b"K"},
        {"namespace": CHECKED},
    ],
    ids=lambda change: next(iter(change)),
)
def test_any_field_changed_after_signing_breaks_the_signature(change: dict[str, object]) -> None:
    validator = make_validator()
    original = record(value=b"123")
    validator.validate(original, NOW)
    tampered = dataclasses.replace(original, **change)  # type: ignore[arg-type]
    assert rejected(validator, tampered) is RejectCode.BAD_SIGNATURE


def test_garbage_signature_and_publisher_without_embedded_key_are_bad_signature() -> None:
    validator = make_validator()
    zeros = dataclasses.replace(record(), signature=bytes(64))
    assert rejected(validator, zeros) is RejectCode.BAD_SIGNATURE
    # A peer id that is not an identity multihash carries no key to verify against.
    sha256_peer_id = b"\x12\x20" + bytes(32)
    keyless = dataclasses.replace(record(), publisher=sha256_peer_id)
    assert rejected(validator, keyless) is RejectCode.BAD_SIGNATURE


def test_expired_record_is_rejected() -> None:
    validator = make_validator()
    rec = record(expires_at_ms=NOW + 1000)
    validator.validate(rec, NOW + 999)
    assert rejected(validator, rec, NOW + 1000) is RejectCode.EXPIRED
    assert rejected(validator, rec, NOW + 10_000) is RejectCode.EXPIRED


def test_expiry_beyond_ttl_and_clock_skew_is_rejected() -> None:
    validator = make_validator()
    limit = NOW + TTL_MS + CLOCK_SKEW_MS
    validator.validate(record(expires_at_ms=limit), NOW)
    assert rejected(validator, record(expires_at_ms=limit + 1)) is RejectCode.EXPIRED
    assert rejected(validator, record(expires_at_ms=2**53 - 1)) is RejectCode.EXPIRED


def test_unknown_namespace_is_not_served() -> None:
    # NOT_FOUND, not FORBIDDEN: a newer peer may publish namespaces this version lacks.
    assert rejected(make_validator(), record(namespace="nobody-serves-this")) is (
        RejectCode.NOT_FOUND
    )


def test_owner_only_namespace_accepts_only_the_publishers_own_key() -> None:
    validator = make_validator()
    validator.validate(record(ALICE, namespace=OWNED, key=ALICE.peer_id_bytes), NOW)
    squatting = record(BOB, namespace=OWNED, key=ALICE.peer_id_bytes)
    assert rejected(validator, squatting) is RejectCode.FORBIDDEN


def test_value_check_of_the_namespace_applies() -> None:
    validator = make_validator()
    validator.validate(record(namespace=CHECKED, value=b"42"), NOW)
    assert rejected(validator, record(namespace=CHECKED, value=b"4x2")) is (
        RejectCode.INVALID_FIELD
    )


def test_core_namespaces_check_announcements_and_ownership() -> None:
    validator = RecordValidator()
    register_core_namespaces(validator)
    ann = encode_announcement(PeerAnnouncement(addrs=("/ip4/1.2.3.4/tcp/1",), reachable=True))
    expires = NOW + MAX_TTL_MS
    validator.validate(
        record(namespace=PEER_NAMESPACE, key=ALICE.peer_id_bytes, value=ann, expires_at_ms=expires),
        NOW,
    )
    validator.validate(
        record(namespace=MEMBERS_NAMESPACE, key=b"net", value=ann, expires_at_ms=expires), NOW
    )
    not_an_announcement = record(
        namespace=MEMBERS_NAMESPACE, key=b"net", value=b"\xc1", expires_at_ms=expires
    )
    assert rejected(validator, not_an_announcement) is RejectCode.MALFORMED
    someone_elses = record(
        BOB, namespace=PEER_NAMESPACE, key=ALICE.peer_id_bytes, value=ann, expires_at_ms=expires
    )
    assert rejected(validator, someone_elses) is RejectCode.FORBIDDEN


# ---- size bounds ----------------------------------------------------------------------------


def _record_body(**fields: object) -> dict[str, object]:
    body = record().to_body()
    body.update(fields)
    return body


@pytest.mark.parametrize(
    "field_name, size",
    [("value", MAX_VALUE + 1), ("key", MAX_RECORD_KEY + 1)],
)
def test_oversized_value_or_key_is_invalid_field(field_name: str, size: int) -> None:
    with pytest.raises(ProtocolViolation) as built:
        record(**{field_name: b"x" * size})  # type: ignore[arg-type]
    assert built.value.code is RejectCode.INVALID_FIELD
    # At the limit the record is still fine.
    record(**{field_name: b"x" * (size - 1)})  # type: ignore[arg-type]

    # The same bound holds for a record that arrives as bytes, alone or inside a PutRecord.
    body = _record_body(**{field_name: b"x" * size})
    for frame in (
        msgpack.packb([WIRE_VERSION, SignedRecord.TYPE, body], use_bin_type=True),
        msgpack.packb([WIRE_VERSION, PutRecord.TYPE, {"record": body}], use_bin_type=True),
    ):
        with pytest.raises(ProtocolViolation) as decoded:
            decode(frame, DHT)
        assert decoded.value.code is RejectCode.INVALID_FIELD


@pytest.mark.parametrize(
    "fields",
    [
        {"signature": b"\x00" * 63},
        {"publisher": b"\x00"},
        {"seq": -1},
        {"seq": 2**63},
        {"expires_at_ms": 0},
        {"namespace": ""},
        {"namespace": "n" * 33},
        {"seq": "1"},
        {"value": "text, not bytes"},
    ],
    ids=repr,
)
def test_out_of_range_fields_are_refused_when_decoding(fields: dict[str, object]) -> None:
    frame = msgpack.packb(
        [WIRE_VERSION, SignedRecord.TYPE, _record_body(**fields)], use_bin_type=True
    )
    with pytest.raises(ProtocolViolation) as info:
        decode(frame, DHT)
    assert info.value.code is RejectCode.INVALID_FIELD


# ---- the store ------------------------------------------------------------------------------


def held(store: LocalRecordStore, rec: SignedRecord, now_ms: int = NOW) -> list[SignedRecord]:
    return store.get(routing_key(rec.namespace, rec.key), now_ms)


def test_newer_seq_replaces_the_publishers_record() -> None:
    store = LocalRecordStore()
    first, second = record(seq=1, value=b"a"), record(seq=2, value=b"b")
    assert store.put(first, NOW)
    assert store.put(second, NOW)
    assert held(store, first) == [second]
    assert len(store) == 1


@pytest.mark.parametrize("seq, value", [(1, b"a"), (2, b"changed")])
def test_older_or_equal_seq_with_other_content_is_stale(seq: int, value: bytes) -> None:
    store = LocalRecordStore()
    current = record(seq=2, value=b"a")
    store.put(current, NOW)
    with pytest.raises(ProtocolViolation) as info:
        store.put(record(seq=seq, value=value), NOW)
    assert info.value.code is RejectCode.STALE
    assert held(store, current) == [current]


def test_identical_put_is_idempotent() -> None:
    store = LocalRecordStore()
    rec = record()
    assert store.put(rec, NOW) is True
    assert store.put(rec, NOW) is False
    assert held(store, rec) == [rec]
    assert len(store) == 1


def test_an_expired_record_is_replaced_even_by_a_lower_seq() -> None:
    # After expiry the publisher may have restarted with a fresh counter; nothing is held.
    store = LocalRecordStore()
    store.put(record(seq=9, expires_at_ms=NOW + 10), NOW)
    later = NOW + 20
    replacement = record(seq=1, expires_at_ms=later + TTL_MS)
    assert store.put(replacement, later)
    assert held(store, replacement, later) == [replacement]


def test_publishers_coexist_under_one_key() -> None:
    store = LocalRecordStore()
    recs = [record(who, value=name) for who, name in ((ALICE, b"a"), (BOB, b"b"), (CAROL, b"c"))]
    for rec in recs:
        store.put(rec, NOW)
    assert sorted(held(store, recs[0]), key=lambda r: r.value) == recs
    store.put(record(BOB, value=b"b2", seq=2), NOW)
    assert {r.value for r in held(store, recs[0])} == {b"a", b"b2", b"c"}
    # Another key, and the same key in another namespace, are separate slots.
    store.put(record(key=b"other"), NOW)
    store.put(record(namespace=CHECKED, value=b"1"), NOW)
    assert len(held(store, recs[0])) == 3
    assert len(store) == 5


def test_expired_records_are_hidden_then_purged() -> None:
    store = LocalRecordStore()
    short = record(ALICE, expires_at_ms=NOW + 100)
    long = record(BOB, expires_at_ms=NOW + 10_000)
    elsewhere = record(CAROL, key=b"elsewhere", expires_at_ms=NOW + 100)
    for rec in (short, long, elsewhere):
        store.put(rec, NOW)
    assert held(store, short, NOW + 100) == [long]
    assert held(store, elsewhere, NOW + 100) == []
    assert store.purge(NOW + 100) == 2
    assert len(store) == 1
    assert store.purge(NOW + 100) == 0
    assert store.purge(NOW + 10_000) == 1
    assert len(store) == 0


def test_key_capacity_is_rate_limited_until_something_expires() -> None:
    store = LocalRecordStore(max_keys=2)
    store.put(record(key=b"a", expires_at_ms=NOW + 100), NOW)
    store.put(record(key=b"b"), NOW)
    with pytest.raises(ProtocolViolation) as info:
        store.put(record(key=b"c"), NOW)
    assert info.value.code is RejectCode.RATE_LIMITED
    # A full store still takes updates to keys it holds.
    store.put(record(key=b"b", seq=2), NOW)
    # Once a key's records expire, a full store purges and makes room.
    assert store.put(record(key=b"c"), NOW + 100)
    assert held(store, record(key=b"a"), NOW + 100) == []


def test_publisher_capacity_per_key_is_rate_limited_until_something_expires() -> None:
    store = LocalRecordStore(max_publishers_per_key=2)
    store.put(record(ALICE, expires_at_ms=NOW + 100), NOW)
    store.put(record(BOB), NOW)
    with pytest.raises(ProtocolViolation) as info:
        store.put(record(CAROL), NOW)
    assert info.value.code is RejectCode.RATE_LIMITED
    # Held publishers may still update, and other keys are not affected.
    store.put(record(BOB, seq=2), NOW)
    store.put(record(CAROL, key=b"other"), NOW)
    assert store.put(record(CAROL), NOW + 100)
    assert {r.publisher for r in held(store, record(), NOW + 100)} == {
        BOB.peer_id_bytes,
        CAROL.peer_id_bytes,
    }


# ---- merging replies --------------------------------------------------------------------------


def test_merge_newest_keeps_the_highest_seq_per_publisher_and_key() -> None:
    a1, a3 = record(ALICE, seq=1), record(ALICE, seq=3)
    b2 = record(BOB, seq=2)
    a_other = record(ALICE, key=b"other", seq=1)
    merged = merge_newest([a1, b2, a3, a1, a_other, b2])
    assert sorted(merged, key=lambda r: (r.key, r.publisher)) == sorted(
        [a3, b2, a_other], key=lambda r: (r.key, r.publisher)
    )
    assert merge_newest([]) == []


# Signing is slow enough that the pool is built once and examples pick from it.
POOL = [
    record(who, key=key, seq=seq, value=b"%d" % seq)
    for who in (ALICE, BOB)
    for key in (b"x", b"y")
    for seq in (1, 2, 3)
]


@settings(max_examples=100, deadline=None, database=None)
@given(picks=st.lists(st.sampled_from(POOL), max_size=12), seed=st.integers(0, 2**32))
def test_merge_newest_matches_a_per_identity_maximum_in_any_order(
    picks: list[SignedRecord], seed: int
) -> None:
    shuffled = list(picks)
    random.Random(seed).shuffle(shuffled)
    expected: dict[tuple[str, bytes, bytes], int] = {}
    for r in picks:
        ident = (r.namespace, r.key, r.publisher)
        expected[ident] = max(expected.get(ident, -1), r.seq)
    merged = merge_newest(shuffled)
    assert {(r.namespace, r.key, r.publisher): r.seq for r in merged} == expected
    assert len(merged) == len(expected)


def test_a_record_seen_again_is_not_verified_again_and_the_memory_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every replica a read asks returns the same records: each signature is checked once.
    What the validator remembers is bounded, and expiry is still checked on every copy."""
    checks: list[bytes] = []
    real = records_module.verify_by_peer

    def counting(publisher: bytes, data: bytes, signature: bytes) -> bool:
        checks.append(signature)
        return real(publisher, data, signature)

    monkeypatch.setattr(records_module, "verify_by_peer", counting)
    monkeypatch.setattr(records_module, "VERIFIED_KEPT", 3)
    validator = make_validator()
    first = record(value=b"1")
    for _ in range(4):
        validator.validate(first, NOW)
    assert len(checks) == 1
    assert rejected(validator, first, now_ms=first.expires_at_ms) is RejectCode.EXPIRED
    for value in (b"2", b"3", b"4"):
        validator.validate(record(value=value), NOW)
    validator.validate(first, NOW)  # forgotten: the oldest of more than three
    assert len(checks) == 5
