"""The score book against a stream of fresh identities: it stays bounded, and what it forgets
first is what a stranger can make again for free, never a peer's good record."""

from __future__ import annotations

import os

from dandelion_p2p.reputation.book import ScoreBook, ScoreEvent, ScorePolicy


def test_fresh_identities_do_not_grow_the_book_past_its_bound_nor_push_out_good_peers() -> None:
    book = ScoreBook(ScorePolicy(max_peers=1000))
    honest = [os.urandom(34) for _ in range(20)]
    for peer in honest:
        book.record(peer, ScoreEvent.SUCCESS, now=0.0, count=4)
    largest = 0
    for i in range(20_000):
        book.record(os.urandom(34), ScoreEvent.MALFORMED, now=1.0 + i * 0.001)
        largest = max(largest, len(book))
    kept = sum(book.score(peer, now=21.0) > 0 for peer in honest)
    print(f"20,000 fresh identities: book peaked at {largest} peers (bound 1000); "
          f"{kept} of {len(honest)} honest records kept")
    assert largest <= 1000
    assert kept == len(honest)


def test_when_only_good_records_are_left_the_lowest_go_first() -> None:
    book = ScoreBook(ScorePolicy(max_peers=10))
    peers = [bytes([i]) * 34 for i in range(10)]
    for i, peer in enumerate(peers):
        book.record(peer, ScoreEvent.SUCCESS, now=0.0, count=1 + i % 8)
    book.record(b"\xff" * 34, ScoreEvent.SUCCESS, now=0.0, count=8)
    assert len(book) == 10
    assert book.score(peers[0], now=0.0) == 0.0, "the lowest good score was forgotten"
    assert book.score(peers[7], now=0.0) == 2.0
