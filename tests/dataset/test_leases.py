"""The lease book on real SQLite: grants, expiry, receipts, epochs, restarts."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dandelion_p2p.dataset.leases import Lease, LeaseBook, NoChunkFree
from dandelion_p2p.dataset.manifest import ChunkEntry, Manifest
from dandelion_p2p.errors import ConfigError, ProtocolViolation
from dandelion_p2p.wire import RejectCode

RUN = "tiny-0123456789abcdef01234567"
A, B, C = b"peer-a", b"peer-b", b"peer-c"


def _manifest(n: int = 4) -> Manifest:
    return Manifest(
        owner="12D3KooWtest",
        chunks=tuple(ChunkEntry(f"{i:064x}", 10, 1000) for i in range(1, n + 1)),
    )


def _book(tmp_path: Path, n: int = 4) -> LeaseBook:
    return LeaseBook(tmp_path / "leases.sqlite", _manifest(n), RUN)


def _grant(book: LeaseBook, peer: bytes, now: float, seconds: float = 10.0) -> Lease:
    lease = book.grant(peer, now, lease_seconds=seconds, max_per_peer=8)
    assert isinstance(lease, Lease)
    return lease


def _complete(book: LeaseBook, lease: Lease, now: float) -> None:
    book.record_receipt(lease_id=lease.id, epoch=lease.epoch, chunk=lease.chunk,
                        peer=lease.peer, samples=10, signature=b"s", now=now)


def test_an_epoch_hands_out_every_chunk_once_then_the_next_starts(tmp_path: Path) -> None:
    book = _book(tmp_path)
    leases = [_grant(book, p, 0.0) for p in (A, B, C, A)]
    assert len({lease.chunk for lease in leases}) == 4 and {lease.epoch for lease in leases} == {0}
    # Every chunk of epoch 0 is out (its holders may be waiting for the others in a round):
    # the next epoch's chunks, each once, and nothing further ahead.
    ahead = [_grant(book, p, 1.0) for p in (B, C, B, C)]
    assert {lease.epoch for lease in ahead} == {1} and len({lease.chunk for lease in ahead}) == 4
    assert book.epoch == 0
    none = book.grant(A, 1.0, lease_seconds=10, max_per_peer=8, max_per_network=64)
    assert isinstance(none, NoChunkFree)
    for lease in leases:
        _complete(book, lease, 2.0)
    assert book.receipts_per_chunk(0) == {c.hash: 1 for c in _manifest().chunks}
    nxt = _grant(book, A, 3.0)  # epoch 1 begins, all of it out: epoch 2's
    assert (nxt.epoch, book.epoch) == (2, 1)
    for lease in ahead:
        _complete(book, lease, 4.0)
    assert book.receipts_per_chunk(1) == {c.hash: 1 for c in _manifest().chunks}
    last = _grant(book, B, 5.0)  # epochs 1 done, 2 begun ahead: it is the current one
    assert (last.epoch, book.epoch) == (2, 2) and last.chunk != nxt.chunk


def test_expired_lease_is_granted_again_and_a_late_receipt_still_counts(tmp_path: Path) -> None:
    book = _book(tmp_path, n=1)
    first = _grant(book, A, 0.0, seconds=5)
    ahead = _grant(book, C, 0.0, seconds=100)  # the next epoch's, while epoch 0's is out
    assert (ahead.epoch, ahead.chunk) == (1, first.chunk)
    assert isinstance(book.grant(B, 4.0, lease_seconds=5, max_per_peer=8), NoChunkFree)
    second = _grant(book, B, 6.0, seconds=5)
    assert second.chunk == first.chunk and second.id != first.id and second.epoch == 0
    _complete(book, first, 7.0)  # A finished after all: first receipt wins
    with pytest.raises(ProtocolViolation) as exc:
        _complete(book, second, 8.0)
    assert exc.value.code == RejectCode.STALE
    assert book.receipts_per_chunk(0) == {first.chunk: 1}


def test_receipts_are_checked_against_their_lease(tmp_path: Path) -> None:
    book = _book(tmp_path)
    lease = _grant(book, A, 0.0)
    cases = [
        (dict(lease_id=999), RejectCode.NOT_FOUND),
        (dict(peer=B), RejectCode.FORBIDDEN),
        (dict(chunk=f"{99:064x}"), RejectCode.INVALID_FIELD),
    ]
    for change, code in cases:
        fields = dict(lease_id=lease.id, epoch=0, chunk=lease.chunk, peer=A, samples=1,
                      signature=b"s", now=1.0)
        fields.update(change)
        with pytest.raises(ProtocolViolation) as exc:
            book.record_receipt(**fields)  # type: ignore[arg-type]
        assert exc.value.code == code
    _complete(book, lease, 2.0)
    again = book.record_receipt(lease_id=lease.id, epoch=0, chunk=lease.chunk, peer=A,
                                samples=10, signature=b"s", now=3.0)
    assert again.duplicate and again.completed == 1


def test_each_epoch_visits_every_chunk_in_its_own_order(tmp_path: Path) -> None:
    book = _book(tmp_path, n=6)
    orders = []
    for _ in range(3):
        epoch = [_grant(book, A, 0.0) for _ in range(6)]
        assert len({lease.chunk for lease in epoch}) == 6
        for lease in epoch:
            _complete(book, lease, 1.0)
        orders.append([lease.chunk for lease in epoch])
    assert len({tuple(o) for o in orders}) == 3
    assert book.receipts_per_chunk(2) == {c.hash: 1 for c in _manifest(6).chunks}


def test_one_peer_cannot_hold_more_than_its_share(tmp_path: Path) -> None:
    book = _book(tmp_path)
    assert isinstance(book.grant(B, 0.0, lease_seconds=10, max_per_peer=2), Lease)
    assert isinstance(book.grant(B, 0.0, lease_seconds=10, max_per_peer=2), Lease)
    with pytest.raises(ProtocolViolation) as exc:
        book.grant(B, 0.0, lease_seconds=10, max_per_peer=2)
    assert exc.value.code == RejectCode.RATE_LIMITED
    assert isinstance(book.grant(B, 11.0, lease_seconds=10, max_per_peer=2), Lease)


def test_state_survives_reopening_and_refuses_another_manifest(tmp_path: Path) -> None:
    book = _book(tmp_path)
    lease = _grant(book, A, 0.0)
    other = _grant(book, B, 0.0)
    _complete(book, other, 1.0)
    book.close()
    reopened = _book(tmp_path)
    assert reopened.lease(lease.id) is not None
    assert reopened.status(2.0)["active_leases"] == 1
    assert reopened.completed(0) == 1
    _complete(reopened, lease, 3.0)
    reopened.close()
    with pytest.raises(ConfigError, match="another dataset"):
        LeaseBook(tmp_path / "leases.sqlite", _manifest(5), RUN)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from("gcw"), st.integers(0, 2)), max_size=60))
def test_never_two_active_leases_nor_two_receipts(
    tmp_path: Path, ops: list[tuple[str, int]]
) -> None:
    path = tmp_path / f"prop-{uuid.uuid4().hex}.sqlite"
    book = LeaseBook(path, _manifest(3), RUN)
    peers = (A, B, C)
    held: list[Lease] = []
    now = 0.0
    for op, who in ops:
        if op == "g":
            try:
                got = book.grant(peers[who], now, lease_seconds=3, max_per_peer=2)
            except ProtocolViolation:
                continue
            if isinstance(got, Lease):
                active = [h for h in held if h.expires_at > now and h.chunk == got.chunk
                          and h.epoch == got.epoch]
                done = book.receipts_per_chunk(got.epoch)[got.chunk]
                assert not active or done, "a chunk was granted twice at once"
                held.append(got)
        elif op == "c" and held:
            lease = held.pop(who % len(held))
            try:
                _complete(book, lease, now)
            except ProtocolViolation as exc:
                assert exc.code == RejectCode.STALE
        else:
            now += 2.0
        for count in book.receipts_per_chunk(book.epoch).values():
            assert count <= 1
    book.close()


def _finish_epoch_zero_in_bulk(book: LeaseBook, chunks: int) -> None:
    """An epoch 0 with a receipt for every chunk, written in one transaction."""
    with book._transaction():
        for i in range(chunks):
            chunk = f"{i + 1:064x}"
            cursor = book.db.execute(
                "INSERT INTO leases(epoch, chunk, peer, granted_at, expires_at, state) "
                "VALUES (0, ?, ?, 0, 10, 'done')", (chunk, A))
            book.db.execute(
                "INSERT INTO receipts(epoch, chunk, lease_id, peer, samples, signature, "
                "received_at) VALUES (0, ?, ?, ?, 10, x'00', 1)",
                (chunk, cursor.lastrowid, A))


def test_grants_count_receipts_per_chunk_through_an_index(tmp_path: Path) -> None:
    from dandelion_p2p.dataset.leases import NEXT_CHUNK_QUERY

    chunks = 5000
    book = _book(tmp_path, n=chunks)
    _finish_epoch_zero_in_bulk(book, chunks)
    leases = [_grant(book, p, 5.0) for p in (A, B, C)]
    assert {lease.epoch for lease in leases} == {1} and len({x.chunk for x in leases}) == 3
    plan = " | ".join(
        row[3] for row in book.db.execute("EXPLAIN QUERY PLAN " + NEXT_CHUNK_QUERY, (1, 1, 1))
    )
    assert "SCAN r2" not in plan and "USING COVERING INDEX receipts_by_chunk" in plan, plan
    book.close()


def test_a_database_made_before_the_receipt_index_gets_it_on_open(tmp_path: Path) -> None:
    book = _book(tmp_path)
    book.db.execute("DROP INDEX receipts_by_chunk")
    book.close()
    reopened = _book(tmp_path)
    names = {row[0] for row in reopened.db.execute("SELECT name FROM sqlite_master "
                                                   "WHERE type='index'")}
    assert "receipts_by_chunk" in names
    reopened.close()
