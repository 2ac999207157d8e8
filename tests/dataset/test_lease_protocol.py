"""The lease protocol's core without sockets: requests pushed through ``LeaseDesk`` (over a
real lease book on disk), answers through ``LeaseRound``, receipts and manifests checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from dandelion_p2p.dataset.lease_protocol import (
    LeaseDesk,
    LeaseRound,
    grant_problem,
    manifest_of_run,
    receipt_for,
)
from dandelion_p2p.dataset.leases import LeaseBook
from dandelion_p2p.dataset.manifest import (
    ChunkEntry,
    Manifest,
    canonical_json,
    sign_manifest,
    signed_digest,
)
from dandelion_p2p.dataset.messages import (
    DATASET,
    ChunkHeader,
    Complete,
    CompleteAck,
    LeaseGrant,
    LeaseRequest,
    NoLease,
    Receipt,
)
from dandelion_p2p.errors import PeerUnavailable, ProtocolViolation, RejectCode, RemoteRejected
from dandelion_p2p.identity import Identity, verify_by_peer
from dandelion_p2p.runconfig.publication import derive_run_id
from dandelion_p2p.runconfig.schema import DatasetConfig
from dandelion_p2p.wire import Message, decode, encode

OWNER = Identity.generate()
RUN = derive_run_id(OWNER.peer_id_bytes, "tiny")
ALICE, BOB = Identity.generate(), Identity.generate()
UNCHECKED_PROOF = bytes(32)
"""A possession proof for a desk that checks none (it holds no chunk files)."""


def _manifest(chunks: int = 3) -> Manifest:
    return Manifest(
        owner=OWNER.peer_id.to_base58(),
        chunks=tuple(ChunkEntry(f"{i:064x}", 10 + i, 1000 + i) for i in range(1, chunks + 1)),
    )


@pytest.fixture
def desk(tmp_path: Path) -> Iterator[LeaseDesk]:
    book = LeaseBook(tmp_path / "leases.sqlite", _manifest(), RUN)
    yield LeaseDesk(RUN, book, DatasetConfig(lease_seconds=30, max_leases_per_peer=2))
    book.close()


def _over_the_wire(msg: Message) -> Message:
    return decode(encode(msg), DATASET)


def ask(desk: LeaseDesk, peer: Identity, msg: Message, now: float = 100.0) -> Message:
    """One request as the server sees it: decoded from its bytes, answered, encoded back."""
    reply = desk.answer(peer.peer_id_bytes, _over_the_wire(msg), now)
    return _over_the_wire(reply)


def refusal(desk: LeaseDesk, peer: Identity, msg: Message, now: float = 100.0) -> RejectCode:
    with pytest.raises(ProtocolViolation) as exc:
        desk.answer(peer.peer_id_bytes, _over_the_wire(msg), now)
    return exc.value.code


def grant(desk: LeaseDesk, peer: Identity, now: float = 100.0) -> LeaseGrant:
    reply = ask(desk, peer, LeaseRequest(run=RUN), now)
    assert isinstance(reply, LeaseGrant)
    return reply


def test_grants_follow_the_manifest_until_the_epoch_is_out(desk: LeaseDesk) -> None:
    entries = {c.hash: c for c in _manifest().chunks}
    first, second = grant(desk, ALICE), grant(desk, BOB)
    for lease in (first, second):
        assert lease.run == RUN and lease.epoch == 0 and lease.expires_in_ms == 30_000
        assert (lease.samples, lease.size) == (entries[lease.chunk].samples,
                                               entries[lease.chunk].size)
    assert first.chunk != second.chunk and first.lease_id != second.lease_id
    grant(desk, ALICE)
    # Alice holds two, the most one peer may: refused.
    assert refusal(desk, ALICE, LeaseRequest(run=RUN)) == RejectCode.RATE_LIMITED
    # Epoch 0 is out: Bob gets a chunk of epoch 1, and once he holds two, Carol is told when
    # to ask again.
    assert grant(desk, BOB).epoch == 1
    carol = Identity.generate()
    for _ in range(2):
        assert grant(desk, carol).epoch == 1
    none_free = ask(desk, Identity.generate(), LeaseRequest(run=RUN))
    assert isinstance(none_free, NoLease) and none_free.epoch == 0
    assert 500 <= none_free.retry_after_ms <= 2000
    assert desk.served_requests == 8


def test_requests_for_another_run_or_of_another_kind_are_refused(desk: LeaseDesk) -> None:
    other = derive_run_id(OWNER.peer_id_bytes, "other")
    assert refusal(desk, ALICE, LeaseRequest(run=other)) == RejectCode.NOT_FOUND
    lease = grant(desk, ALICE)
    foreign = receipt_for(dataclasses.replace(lease, run=other), ALICE.peer_id_bytes, ALICE.sign,
                          UNCHECKED_PROOF)
    assert refusal(desk, ALICE, Complete(receipt=foreign)) == RejectCode.NOT_FOUND
    stray = ChunkHeader(chunk=lease.chunk, size=lease.size)
    assert refusal(desk, ALICE, stray) == RejectCode.UNKNOWN_TYPE


def test_a_receipt_is_taken_once_and_acknowledged_again(desk: LeaseDesk) -> None:
    lease = grant(desk, ALICE)
    receipt = receipt_for(lease, ALICE.peer_id_bytes, ALICE.sign, UNCHECKED_PROOF)
    ack = ask(desk, ALICE, Complete(receipt=receipt))
    assert ack == CompleteAck(epoch=0, completed=1, total=3)
    # Its acknowledgement was lost: the peer sends it again.
    assert ask(desk, ALICE, Complete(receipt=receipt)) == ack
    assert desk.receipts_taken == 1
    assert desk.book.receipts_per_chunk(0)[lease.chunk] == 1


def test_receipts_are_checked_in_the_order_the_spec_gives(desk: LeaseDesk) -> None:
    lease = grant(desk, ALICE, now=100.0)

    def signed(**change: object) -> Complete:
        fields = dataclasses.replace(lease, **change)  # type: ignore[arg-type]
        return Complete(
            receipt=receipt_for(fields, ALICE.peer_id_bytes, ALICE.sign, UNCHECKED_PROOF)
        )

    unsigned = Receipt(run=RUN, lease_id=lease.lease_id, epoch=lease.epoch, chunk=lease.chunk,
                       peer=ALICE.peer_id_bytes, samples=lease.samples,
                       possession=UNCHECKED_PROOF)
    forged = unsigned.signed_with(BOB.sign)
    in_bobs_name = receipt_for(lease, BOB.peer_id_bytes, BOB.sign, UNCHECKED_PROOF)
    other_chunk = next(c.hash for c in _manifest().chunks if c.hash != lease.chunk)
    assert refusal(desk, ALICE, Complete(receipt=in_bobs_name)) == RejectCode.FORBIDDEN
    assert refusal(desk, ALICE, Complete(receipt=unsigned)) == RejectCode.BAD_SIGNATURE
    assert refusal(desk, ALICE, Complete(receipt=forged)) == RejectCode.BAD_SIGNATURE
    assert refusal(desk, ALICE, signed(lease_id=lease.lease_id + 50)) == RejectCode.NOT_FOUND
    assert refusal(desk, ALICE, signed(chunk=other_chunk)) == RejectCode.INVALID_FIELD
    assert refusal(desk, ALICE, signed(epoch=1)) == RejectCode.INVALID_FIELD
    # Bob signs a receipt of his own for Alice's lease.
    bobs = receipt_for(lease, BOB.peer_id_bytes, BOB.sign, UNCHECKED_PROOF)
    assert refusal(desk, BOB, Complete(receipt=bobs)) == RejectCode.FORBIDDEN
    assert desk.receipts_taken == 0

    # Alice's lease expires, Bob gets the chunk and completes it first: Alice is too late.
    later = 100.0 + 31
    for _ in range(3):
        again = grant(desk, BOB, now=later)
        if again.chunk == lease.chunk:
            break
        bobs_again = receipt_for(again, BOB.peer_id_bytes, BOB.sign, UNCHECKED_PROOF)
        ask(desk, BOB, Complete(receipt=bobs_again), later)
    assert again.chunk == lease.chunk
    ask(desk, BOB, Complete(
        receipt=receipt_for(again, BOB.peer_id_bytes, BOB.sign, UNCHECKED_PROOF)), later)
    assert refusal(desk, ALICE, signed(), later) == RejectCode.STALE


def test_receipt_signed_bytes_are_the_array_the_spec_lists() -> None:
    proof = bytes(range(32))
    receipt = Receipt(run=RUN, lease_id=7, epoch=2, chunk="ab" * 32, peer=ALICE.peer_id_bytes,
                      samples=9, possession=proof, signature=b"s")
    assert receipt.signed_bytes() == msgpack.packb(
        [b"dandelion/receipt/v2", RUN, 7, 2, "ab" * 32, ALICE.peer_id_bytes, 9, proof],
        use_bin_type=True,
    )
    lease = LeaseGrant(run=RUN, lease_id=7, epoch=2, chunk="ab" * 32, samples=9, size=100,
                       expires_in_ms=1000, nonce=bytes(32))
    mine = receipt_for(lease, ALICE.peer_id_bytes, ALICE.sign, proof, samples=4)
    assert mine.samples == 4 and mine.peer == ALICE.peer_id_bytes and mine.possession == proof
    assert verify_by_peer(ALICE.peer_id_bytes, mine.signed_bytes(), mine.signature)


# ---- the client's end ------------------------------------------------------------------------

SERVER_A, SERVER_B, SERVER_C = (Identity.generate().peer_id_bytes for _ in range(3))
CHUNK = _manifest().chunks[0]


def _grant_of(entry: ChunkEntry, run: str = RUN) -> LeaseGrant:
    return LeaseGrant(run=run, lease_id=1, epoch=0, chunk=entry.hash, samples=entry.samples,
                      size=entry.size, expires_in_ms=1000, nonce=bytes(32))


def test_grant_problems_name_what_is_wrong() -> None:
    entries = {c.hash: c for c in _manifest().chunks}
    other_run = derive_run_id(OWNER.peer_id_bytes, "other")
    assert grant_problem(_grant_of(CHUNK), RUN, entries) == ""
    assert grant_problem(_grant_of(CHUNK), RUN, None) == ""
    assert "a grant for run" in grant_problem(_grant_of(CHUNK, other_run), RUN, None)
    stranger = ChunkEntry("f" * 64, 1, 1)
    assert "not in the run's manifest" in grant_problem(_grant_of(stranger), RUN, entries)
    resized = ChunkEntry(CHUNK.hash, CHUNK.samples, CHUNK.size + 1)
    assert "other samples or size" in grant_problem(_grant_of(resized), RUN, entries)


def test_a_round_takes_the_first_valid_grant() -> None:
    entries = {c.hash: c for c in _manifest().chunks}
    lease_round = LeaseRound(RUN, entries)
    assert lease_round.answered(SERVER_A, NoLease(epoch=0, retry_after_ms=900)) is None
    with pytest.raises(ProtocolViolation) as exc:
        lease_round.answered(SERVER_B, _grant_of(ChunkEntry("f" * 64, 1, 1)))
    assert exc.value.code == RejectCode.INVALID_FIELD
    assert lease_round.answered(SERVER_C, _grant_of(CHUNK)) == _grant_of(CHUNK)


def test_a_round_without_a_grant_waits_as_the_soonest_server_says() -> None:
    lease_round = LeaseRound(RUN, None)
    lease_round.failed(SERVER_A, RemoteRejected(int(RejectCode.RATE_LIMITED), "busy"))
    lease_round.answered(SERVER_B, NoLease(epoch=0, retry_after_ms=900))
    lease_round.answered(SERVER_C, NoLease(epoch=0, retry_after_ms=600))
    assert lease_round.outcome() == NoLease(epoch=0, retry_after_ms=600)


def test_a_round_without_a_grant_or_a_wait_raises_the_first_real_refusal() -> None:
    lease_round = LeaseRound(RUN, None)
    lease_round.failed(SERVER_A, RemoteRejected(int(RejectCode.NOT_FOUND), "not here"))
    lease_round.failed(SERVER_B, RemoteRejected(int(RejectCode.RATE_LIMITED), "busy"))
    lease_round.failed(SERVER_C, RemoteRejected(int(RejectCode.FORBIDDEN), "banned"))
    with pytest.raises(RemoteRejected) as exc:
        lease_round.outcome()
    assert exc.value.code == RejectCode.RATE_LIMITED


def test_a_round_where_nobody_answered_says_why_for_each_server() -> None:
    lease_round = LeaseRound(RUN, None)
    lease_round.failed(SERVER_A, PeerUnavailable("timed out"))
    lease_round.failed(SERVER_B, RemoteRejected(int(RejectCode.NOT_FOUND), "not here"))
    lease_round.answered(SERVER_C, CompleteAck(epoch=0, completed=0, total=1))
    with pytest.raises(PeerUnavailable) as exc:
        lease_round.outcome()
    text = str(exc.value)
    assert "timed out" in text and "not here" in text and "unexpected CompleteAck" in text


def _signed_document(manifest: Manifest, signer: Identity) -> bytes:
    return canonical_json(sign_manifest(manifest, signer))


def test_a_fetched_manifest_must_be_the_run_owners() -> None:
    raw = _signed_document(_manifest(), OWNER)
    digest = signed_digest(raw)
    assert manifest_of_run(raw, digest, RUN) == _manifest()
    mallory = Identity.generate()
    theirs = dataclasses.replace(_manifest(), owner=mallory.peer_id.to_base58())
    forged = _signed_document(theirs, mallory)
    spoiled = raw.replace(b'"samples":11', b'"samples":12')
    for document, asked_for in ((raw, "0" * 64), (forged, signed_digest(forged)),
                                (spoiled, signed_digest(spoiled)), (b"[", signed_digest(b"["))):
        with pytest.raises(ProtocolViolation) as exc:
            manifest_of_run(document, asked_for, RUN)
        assert exc.value.code == RejectCode.INVALID_FIELD
