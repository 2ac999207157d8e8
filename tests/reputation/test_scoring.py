from __future__ import annotations

import json
import logging
import random

import pytest
from libp2p.peer.id import ID

from dandelion_p2p.reputation.book import (
    ScoreBook,
    ScoreEvent,
    ScorePolicy,
)
from dandelion_p2p.reputation.store import SCORES_FILENAME, load_book, save_book

ALICE = bytes.fromhex(
    "0024080112205b2d3a9a2c3e7e0f5b1c6a1f6a0e2b7c3d4e5f60718293a4b5c6d7e8f90a1b2c"
)
MALLORY = bytes.fromhex(
    "002408011220ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100"
)
T0 = 1_700_000_000.0
MINUTE = 60.0


def test_new_peers_are_neutral_and_good_records_are_capped():
    book = ScoreBook()
    assert book.score(ALICE, T0) == 0.0
    assert not book.is_banned(ALICE, T0)
    for _ in range(100):
        book.record(ALICE, ScoreEvent.SUCCESS, T0)
    assert book.score(ALICE, T0) == book.policy.max_score


def test_scores_decay_toward_neutral_with_the_half_life():
    book = ScoreBook()
    book.record(ALICE, ScoreEvent.TIMEOUT, T0, count=4)
    half_life = book.policy.half_life
    assert book.score(ALICE, T0) == pytest.approx(-4.0)
    assert book.score(ALICE, T0 + half_life) == pytest.approx(-2.0)
    assert book.score(ALICE, T0 + 10 * half_life) == pytest.approx(-4.0 / 1024)
    book.record(ALICE, ScoreEvent.SUCCESS, T0 + half_life)
    assert book.score(ALICE, T0 + half_life) == pytest.approx(-1.75)


@pytest.mark.parametrize("round_interval", [1 * MINUTE, 10 * MINUTE, 30 * MINUTE, 60 * MINUTE])
@pytest.mark.parametrize("garbage", [ScoreEvent.MALFORMED, ScoreEvent.BAD_SIGNATURE])
def test_garbage_on_every_chunk_is_banned_within_two_rounds(round_interval, garbage):
    book = ScoreBook()
    now = T0
    # The worst case: a long good record first, and only one chunk per round.
    for _ in range(50):
        book.record(MALLORY, ScoreEvent.SUCCESS, now)
        now += round_interval
    banned_in = None
    for round_no in (1, 2):
        if book.record(MALLORY, garbage, now):
            banned_in = round_no
            break
        now += round_interval
    assert banned_in is not None
    assert book.is_banned(MALLORY, now)
    if garbage is ScoreEvent.BAD_SIGNATURE:
        assert banned_in == 1


def test_garbage_on_several_chunks_is_banned_in_the_first_round():
    book = ScoreBook()
    for _ in range(50):
        book.record(MALLORY, ScoreEvent.SUCCESS, T0)
    book.record(MALLORY, ScoreEvent.MALFORMED, T0)
    assert book.record(MALLORY, ScoreEvent.MALFORMED, T0)


@pytest.mark.parametrize("seed", range(5))
def test_honest_peer_with_occasional_timeouts_is_never_banned(seed):
    rnd = random.Random(seed)
    book = ScoreBook()
    now = T0
    for _ in range(2000):
        if rnd.random() < 0.15:
            book.record(ALICE, ScoreEvent.TIMEOUT, now)
        else:
            book.record(ALICE, ScoreEvent.SUCCESS, now)
        if rnd.random() < 0.02:
            book.record(ALICE, ScoreEvent.OUTLIER, now)
        assert not book.is_banned(ALICE, now)
        now += rnd.uniform(1, 20) * MINUTE


def test_five_timeouts_in_a_row_are_tolerated_six_are_not():
    book = ScoreBook()
    for _ in range(5):
        assert not book.record(ALICE, ScoreEvent.TIMEOUT, T0)
    assert book.record(ALICE, ScoreEvent.TIMEOUT, T0)


def test_bans_expire_and_repeat_offences_ban_longer():
    policy = ScorePolicy()
    book = ScoreBook(policy)
    assert book.record(MALLORY, ScoreEvent.BAD_SIGNATURE, T0)
    first_end = T0 + policy.ban_duration
    assert book.is_banned(MALLORY, first_end - 1)
    assert not book.is_banned(MALLORY, first_end)
    # Events while banned do not extend or stack the ban.
    assert not book.record(MALLORY, ScoreEvent.BAD_SIGNATURE, T0 + 1)
    assert book.standing(MALLORY, T0 + 1).bans == 1

    assert book.record(MALLORY, ScoreEvent.BAD_SIGNATURE, first_end)
    second = book.standing(MALLORY, first_end)
    assert second.bans == 2
    assert second.banned_until == first_end + 2 * policy.ban_duration

    # After a long clean stretch the ban history is forgiven.
    later = second.banned_until + policy.ban_memory + 1
    assert book.record(MALLORY, ScoreEvent.BAD_SIGNATURE, later)
    assert book.standing(MALLORY, later).banned_until == later + policy.ban_duration


def test_ban_duration_is_capped():
    policy = ScorePolicy(ban_duration=100.0, max_ban_duration=250.0)
    book = ScoreBook(policy)
    now = T0
    for _ in range(6):
        assert book.record(MALLORY, ScoreEvent.BAD_SIGNATURE, now)
        now = book.standing(MALLORY, now).banned_until or now
    assert book.standing(MALLORY, now - 1).banned_until == now


def test_successes_never_start_a_ban():
    book = ScoreBook()
    book.record(MALLORY, ScoreEvent.BAD_SIGNATURE, T0)
    book.record(MALLORY, ScoreEvent.MALFORMED, T0 + 1, count=3)
    after = T0 + book.policy.ban_duration
    assert not book.is_banned(MALLORY, after)
    assert book.score(MALLORY, after) < book.policy.ban_threshold
    assert not book.record(MALLORY, ScoreEvent.SUCCESS, after)
    assert not book.is_banned(MALLORY, after)


def test_scores_are_floored_so_no_ban_is_forever():
    book = ScoreBook()
    book.record(MALLORY, ScoreEvent.BAD_SIGNATURE, T0, count=1000)
    assert book.score(MALLORY, T0) == book.policy.min_score


def test_a_clock_stepping_back_does_not_decay_twice():
    book = ScoreBook()
    book.record(ALICE, ScoreEvent.TIMEOUT, T0, count=4)
    book.record(ALICE, ScoreEvent.SUCCESS, T0 - 3600)
    assert book.score(ALICE, T0) == pytest.approx(-3.75)


def test_snapshot_lists_worst_first_with_base58_ids():
    book = ScoreBook()
    book.record(ALICE, ScoreEvent.SUCCESS, T0)
    book.record(MALLORY, ScoreEvent.BAD_SIGNATURE, T0)
    snap = book.snapshot(T0 + 1)
    assert [s.peer_id for s in snap] == [MALLORY, ALICE]
    shown = snap[0].to_json()
    assert shown["peer"] == ID(MALLORY).to_base58()
    assert shown["banned_until"] == T0 + book.policy.ban_duration
    assert shown["events"] == {"bad_signature": 1}
    json.dumps([s.to_json() for s in snap])


def test_prune_forgets_neutral_peers_only():
    book = ScoreBook()
    book.record(ALICE, ScoreEvent.SUCCESS, T0)
    book.record(MALLORY, ScoreEvent.BAD_SIGNATURE, T0)
    later = T0 + 12 * book.policy.half_life  # both scores near 0, Mallory's ban remembered
    assert book.prune(T0) == 0
    assert book.prune(later) == 1
    assert book.standing(MALLORY, later).bans == 1
    assert book.prune(later + book.policy.ban_memory) == 1
    assert len(book) == 0


def test_save_and_load_round_trip(tmp_path):
    book = ScoreBook()
    book.record(ALICE, ScoreEvent.SUCCESS, T0)
    book.record(MALLORY, ScoreEvent.MALFORMED, T0, count=2)
    path = tmp_path / "data" / SCORES_FILENAME
    save_book(book, path)
    assert sorted(p.name for p in path.parent.iterdir()) == [SCORES_FILENAME]
    stored = json.loads(path.read_text())
    assert set(stored["peers"]) == {ID(ALICE).to_base58(), ID(MALLORY).to_base58()}

    loaded = load_book(path)
    later = T0 + 1234.0
    assert loaded.snapshot(later) == book.snapshot(later)
    assert loaded.is_banned(MALLORY, later)

    book.record(ALICE, ScoreEvent.TIMEOUT, T0 + 1)
    save_book(book, path)
    assert load_book(path).score(ALICE, T0 + 1) == pytest.approx(-0.75, rel=1e-3)


def test_missing_file_starts_empty_silently(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        book = load_book(tmp_path / SCORES_FILENAME)
    assert len(book) == 0
    assert not caplog.records


GOOD_ENTRY: dict[str, object] = {
    "score": -1.0,
    "updated": T0,
    "banned_until": None,
    "bans": 0,
    "events": {},
}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe garbage",
        b"[]",
        b'{"format": "something else", "version": 1, "peers": {}}',
        json.dumps({"format": "dandelion-scores", "version": 99, "peers": {}}).encode(),
        json.dumps({"format": "dandelion-scores", "version": 1, "peers": []}).encode(),
        json.dumps(
            {"format": "dandelion-scores", "version": 1, "peers": {"0OIl": GOOD_ENTRY}}
        ).encode(),
        json.dumps(
            {
                "format": "dandelion-scores",
                "version": 1,
                "peers": {ID(ALICE).to_base58(): {**GOOD_ENTRY, "score": "high"}},
            }
        ).encode(),
        json.dumps(
            {
                "format": "dandelion-scores",
                "version": 1,
                "peers": {ID(ALICE).to_base58(): {**GOOD_ENTRY, "bans": -1}},
            }
        ).encode(),
        json.dumps(
            {
                "format": "dandelion-scores",
                "version": 1,
                "peers": {ID(ALICE).to_base58(): {"score": 1.0}},
            }
        ).encode(),
        b'{"format": "dandelion-scores", "version": 1, "peers": {"x": {"score": NaN}}}',
        b"[" * 100_000,
    ],
)
def test_corrupt_file_starts_empty_with_a_warning(tmp_path, caplog, content):
    path = tmp_path / SCORES_FILENAME
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        book = load_book(path)
    assert len(book) == 0
    assert any("starting empty" in r.getMessage() for r in caplog.records)


def test_valid_file_with_good_entry_loads(tmp_path):
    path = tmp_path / SCORES_FILENAME
    entry = {**GOOD_ENTRY, "events": {"timeout": 1}}
    data = {"format": "dandelion-scores", "version": 1, "peers": {ID(ALICE).to_base58(): entry}}
    path.write_text(json.dumps(data))
    assert load_book(path).score(ALICE, T0) == -1.0


def test_policy_is_validated():
    with pytest.raises(ValueError):
        ScorePolicy(ban_threshold=1.0)
    with pytest.raises(ValueError):
        ScorePolicy(half_life=0.0)
    with pytest.raises(ValueError):
        ScoreBook().record(ALICE, ScoreEvent.SUCCESS, T0, count=-1)
