"""The notes protocol pushed through its sans-IO core: no host, no stream, no clock."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.identity import Identity
from dandelion_p2p.net.dht.messages import FindNode
from dandelion_p2p.net.notes.protocol import (
    MAX_AGE_MS,
    MAX_TEXT,
    NOTES,
    Note,
    NoteInbox,
    check_receipt,
    sign_note,
    verify_note,
)
from dandelion_p2p.wire import RejectCode, decode, encode

ALICE = Identity.from_seed(b"\x01" * 32)
BOB = Identity.from_seed(b"\x02" * 32)
MALLORY = Identity.from_seed(b"\x03" * 32)
NOW = 1_700_000_000_000
NONCE = bytes(range(16))


def note(text: str = "hello", *, signer: Identity = ALICE, to: Identity = BOB,
         sent_at_ms: int = NOW, nonce: bytes = NONCE) -> Note:
    return sign_note(signer, to.peer_id_bytes, text, nonce, sent_at_ms=sent_at_ms)


def refused(inbox: NoteInbox, msg: object, *, from_peer: bytes = ALICE.peer_id_bytes,
            now_ms: int = NOW) -> RejectCode:
    with pytest.raises(ProtocolViolation) as info:
        inbox.receive(msg, from_peer=from_peer, now_ms=now_ms)  # type: ignore[arg-type]
    assert not inbox.received
    return info.value.code


def test_signed_bytes_are_the_array_of_the_spec() -> None:
    """protocol/notes.md section 3: the domain, then every field but the signature."""
    n = note()
    assert n.signed_bytes() == msgpack.packb(
        [b"dandelion/note/v1", ALICE.peer_id_bytes, BOB.peer_id_bytes, "hello", NOW, NONCE],
        use_bin_type=True,
    )
    verify_note(n, from_peer=ALICE.peer_id_bytes, to_peer=BOB.peer_id_bytes, now_ms=NOW)


def test_a_note_is_answered_by_a_receipt_the_requester_accepts() -> None:
    inbox = NoteInbox(BOB)
    sent = note()
    arrived = decode(encode(sent), NOTES)
    receipt = inbox.receive(arrived, from_peer=ALICE.peer_id_bytes, now_ms=NOW + 5)
    assert (receipt.sender, receipt.recipient) == (BOB.peer_id_bytes, ALICE.peer_id_bytes)
    assert receipt.text == "received: hello"
    assert receipt.nonce == NONCE
    assert receipt.sent_at_ms == NOW + 5
    [kept] = inbox.received
    assert (kept.sender, kept.text, kept.sent_at_ms, kept.received_at_ms) == (
        ALICE.peer_id.to_base58(), "hello", NOW, NOW + 5
    )
    back = decode(encode(receipt), NOTES)
    assert check_receipt(back, sent, from_peer=BOB.peer_id_bytes, now_ms=NOW + 9) == receipt


def test_the_receipt_text_is_cut_to_the_limit() -> None:
    receipt = NoteInbox(BOB).receive(
        note("x" * MAX_TEXT), from_peer=ALICE.peer_id_bytes, now_ms=NOW
    )
    assert len(receipt.text) == MAX_TEXT
    assert receipt.text.startswith("received: x")


def test_the_inbox_keeps_only_the_newest_notes() -> None:
    inbox = NoteInbox(BOB, keep=2)
    for text in ("one", "two", "three"):
        inbox.receive(note(text), from_peer=ALICE.peer_id_bytes, now_ms=NOW)
    assert [n.text for n in inbox.received] == ["two", "three"]


def test_verification_rules_apply_in_the_order_of_the_spec() -> None:
    inbox = NoteInbox(BOB)
    assert refused(inbox, FindNode(target=bytes(32))) is RejectCode.UNKNOWN_TYPE
    # 1. the signer is not the connected peer, however else the note is broken
    stale_and_forged = dataclasses.replace(note(sent_at_ms=0), signature=bytes(64))
    assert refused(inbox, stale_and_forged, from_peer=MALLORY.peer_id_bytes) is (
        RejectCode.FORBIDDEN
    )
    # 2. addressed to someone else
    assert refused(inbox, note(to=MALLORY, sent_at_ms=0)) is RejectCode.INVALID_FIELD
    # 3. too old or from the future, by more than five minutes
    assert refused(inbox, note(), now_ms=NOW + MAX_AGE_MS + 1) is RejectCode.EXPIRED
    assert refused(inbox, note(), now_ms=NOW - MAX_AGE_MS - 1) is RejectCode.EXPIRED
    inbox.receive(note(), from_peer=ALICE.peer_id_bytes, now_ms=NOW + MAX_AGE_MS)
    inbox.received.clear()
    # 4. the signature
    tampered = dataclasses.replace(note(), text="changed")
    assert refused(inbox, tampered) is RejectCode.BAD_SIGNATURE
    claimed = dataclasses.replace(note(signer=MALLORY), sender=ALICE.peer_id_bytes)
    assert refused(inbox, claimed) is RejectCode.BAD_SIGNATURE


def test_a_receipt_for_another_note_or_of_another_type_is_unexpected() -> None:
    sent = note()
    other_nonce = sign_note(BOB, ALICE.peer_id_bytes, "received: hello", bytes(16),
                            sent_at_ms=NOW)
    for reply in (other_nonce, FindNode(target=bytes(32))):
        with pytest.raises(ProtocolViolation) as info:
            check_receipt(reply, sent, from_peer=BOB.peer_id_bytes, now_ms=NOW)
        assert info.value.code is RejectCode.UNEXPECTED


def test_a_receipt_signed_by_someone_else_is_refused() -> None:
    sent = note()
    forged = NoteInbox(MALLORY).receive(
        note(to=MALLORY), from_peer=ALICE.peer_id_bytes, now_ms=NOW
    )
    with pytest.raises(ProtocolViolation) as info:
        check_receipt(forged, sent, from_peer=BOB.peer_id_bytes, now_ms=NOW)
    assert info.value.code is RejectCode.FORBIDDEN
