"""The score book: how much each peer is trusted, from what it did in past rounds.

A peer's score starts at 0 (neutral). Events move it (``ScorePolicy`` holds the amounts); it
is capped at ``max_score`` so that a long good record cannot buy a free attack, floored at
``min_score`` so that a ban is never forever, and decays exponentially toward 0 with
``half_life``. When an event leaves the score at or below ``ban_threshold`` the peer is
banned for ``ban_duration``, doubled for each earlier ban within ``ban_memory`` and capped at
``max_ban_duration``. Announcements list the announcer's bans; matchmaking leaves out the
peers that more than half of the announcers with a good score in our own book banned (votes
of strangers do not count), and each peer cuts off the members it banned itself.

How callers report, so the numbers below mean what they say:

* ``SUCCESS``: once per peer per round in which everything it owed us arrived intact.
* ``TIMEOUT``: once per peer per round in which it was too late (not once per chunk).
* ``OUTLIER``: once per chunk that centered clipping flagged as an outlier.
* ``MALFORMED``: once per chunk that failed to decode or held NaN/infinity.
* ``BAD_SIGNATURE``: once per chunk with a missing or forged signature.

With the default policy a peer at the best possible score that sends garbage on every chunk
is banned in its first round when a round carries two chunks or more, and by its second round
otherwise (for rounds up to about an hour apart). A forged signature bans at once. An honest
peer needs six timeouts in a row, with no success between them, to be banned.

Time is always passed in (``now``, in seconds); nothing here reads a clock or a file
(``reputation.store`` saves and loads books). For a book that is saved and loaded, use a clock
that survives restarts (Unix time).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dandelion_p2p.errors import RejectCode
from dandelion_p2p.identity import PeerId

log = logging.getLogger(__name__)

_FORMAT = "dandelion-scores"
_VERSION = 1


class ScoreEvent(enum.Enum):
    SUCCESS = "success"
    TIMEOUT = "timeout"
    OUTLIER = "outlier"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    # Two conflicting results signed for one chunk: proof of deliberate misbehaviour, which
    # no honest fault produces, so one occurrence bans.
    EQUIVOCATION = "equivocation"


SCORE_EVENT_OF: Mapping[RejectCode, ScoreEvent] = {
    RejectCode.BAD_SIGNATURE: ScoreEvent.BAD_SIGNATURE,
    # Claiming to be someone else (a sender or signer that is not the connected peer).
    RejectCode.FORBIDDEN: ScoreEvent.BAD_SIGNATURE,
    RejectCode.TIMEOUT: ScoreEvent.TIMEOUT,
}
"""How a remote peer's protocol violation, by its reject code, is scored; a code not listed
here scores as ``MALFORMED``."""


@dataclass(frozen=True, slots=True)
class ScorePolicy:
    success: float = 0.25
    timeout: float = -1.0
    outlier: float = -1.0
    malformed: float = -4.5
    bad_signature: float = -10.0
    equivocation: float = -20.0
    max_score: float = 2.0
    min_score: float = -20.0
    ban_threshold: float = -6.0
    half_life: float = 7200.0
    ban_duration: float = 1800.0
    max_ban_duration: float = 86400.0
    ban_memory: float = 86400.0
    max_peers: int = 10_000
    """Peers the book remembers: fresh identities are free, so the book is bounded."""

    def __post_init__(self) -> None:
        if not self.min_score <= self.ban_threshold < 0.0 <= self.max_score:
            raise ValueError("need min_score <= ban_threshold < 0 <= max_score")
        if self.max_peers < 1:
            raise ValueError("max_peers must be >= 1")
        if not (self.half_life > 0 and 0 < self.ban_duration <= self.max_ban_duration):
            raise ValueError("half_life and ban durations must be positive")

    def delta(self, event: ScoreEvent) -> float:
        amount: float = getattr(self, event.value)
        return amount


@dataclass(frozen=True, slots=True)
class Standing:
    """One peer's record as of ``now``, for status displays and logs."""

    peer_id: bytes
    score: float
    banned_until: float | None
    bans: int
    events: Mapping[str, int]

    @property
    def peer(self) -> str:
        return PeerId(self.peer_id).to_base58()

    def to_json(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "score": round(self.score, 4),
            "banned_until": self.banned_until,
            "bans": self.bans,
            "events": dict(self.events),
        }


@dataclass(slots=True)
class _Record:
    score: float = 0.0
    updated: float = 0.0
    banned_until: float | None = None
    bans: int = 0
    events: dict[str, int] = field(default_factory=dict)


class ScoreBook:
    def __init__(self, policy: ScorePolicy | None = None) -> None:
        self.policy = policy or ScorePolicy()
        self._records: dict[bytes, _Record] = {}

    def __len__(self) -> int:
        return len(self._records)

    def record(self, peer: bytes, event: ScoreEvent, now: float, count: int = 1) -> bool:
        """Apply ``count`` occurrences of ``event``; True if this started a ban."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now}")
        rec = self._current(peer, now)
        p = self.policy
        rec.score = min(p.max_score, max(p.min_score, rec.score + count * p.delta(event)))
        rec.events[event.value] = rec.events.get(event.value, 0) + count
        if count == 0 or p.delta(event) >= 0 or rec.score > p.ban_threshold:
            return False
        if self._banned(rec, now):
            return False  # a ban is not extended by what the peer does while banned
        if rec.banned_until is not None and now - rec.banned_until > p.ban_memory:
            rec.bans = 0
        duration = min(p.max_ban_duration, p.ban_duration * 2.0 ** min(rec.bans, 64))
        rec.bans += 1
        rec.banned_until = now + duration
        log.warning(
            "banned peer %s for %.0f s (score %.2f after %s)",
            PeerId(peer).to_base58(),
            duration,
            rec.score,
            event.value,
        )
        return True

    def score(self, peer: bytes, now: float) -> float:
        rec = self._records.get(peer)
        return 0.0 if rec is None else self._decayed(rec, now)

    def is_banned(self, peer: bytes, now: float) -> bool:
        rec = self._records.get(peer)
        return rec is not None and self._banned(rec, now)

    def standing(self, peer: bytes, now: float) -> Standing:
        rec = self._records.get(peer) or _Record(updated=now)
        return Standing(
            peer,
            self._decayed(rec, now),
            rec.banned_until if self._banned(rec, now) else None,
            rec.bans,
            dict(rec.events),
        )

    def snapshot(self, now: float) -> list[Standing]:
        """Every known peer, worst score first (ties by peer id)."""
        standings = [self.standing(peer, now) for peer in self._records]
        return sorted(standings, key=lambda s: (s.score, s.peer_id))

    def prune(self, now: float, epsilon: float = 0.01) -> int:
        """Forget peers whose score has decayed to about neutral and that are not banned nor
        within ``ban_memory`` of a ban; returns how many were dropped."""
        p = self.policy
        stale = [
            peer
            for peer, rec in self._records.items()
            if abs(self._decayed(rec, now)) < epsilon
            and (rec.banned_until is None or now - rec.banned_until > p.ban_memory)
        ]
        for peer in stale:
            del self._records[peer]
        return len(stale)

    def to_json(self) -> dict[str, Any]:
        """The book as a JSON document, for ``reputation.store`` to write."""
        peers = {
            PeerId(peer).to_base58(): {
                "score": rec.score,
                "updated": rec.updated,
                "banned_until": rec.banned_until,
                "bans": rec.bans,
                "events": rec.events,
            }
            for peer, rec in sorted(self._records.items())
        }
        return {"format": _FORMAT, "version": _VERSION, "peers": peers}

    @classmethod
    def from_json(cls, data: Any, policy: ScorePolicy | None = None) -> ScoreBook:
        """The book a ``to_json`` document describes; ``ValueError`` (or a lookup error)
        on anything malformed."""
        book = cls(policy)
        book._records = _parse(data)
        return book

    def _current(self, peer: bytes, now: float) -> _Record:
        rec = self._records.get(peer)
        if rec is None:
            if len(self._records) >= self.policy.max_peers:
                self._make_room(now)
            rec = self._records[peer] = _Record(updated=now)
        rec.score = self._decayed(rec, now)
        # A clock that stepped back must not let a peer's score decay twice.
        rec.updated = max(rec.updated, now)
        return rec

    def _make_room(self, now: float) -> None:
        """Forget a tenth of the book, least worth keeping first: peers without a good score
        (oldest news first, bans included: a banned stranger can make a new key anyway),
        then the lowest good scores. A track record is what a fresh identity cannot make."""
        self.prune(now)
        excess = len(self._records) - self.policy.max_peers + max(1, self.policy.max_peers // 10)
        if excess <= 0:
            return

        def keep_value(item: tuple[bytes, _Record]) -> tuple[bool, float]:
            score = self._decayed(item[1], now)
            return (score > 0.01, score if score > 0.01 else item[1].updated)

        for peer, _ in sorted(self._records.items(), key=keep_value)[:excess]:
            del self._records[peer]

    def _decayed(self, rec: _Record, now: float) -> float:
        elapsed = max(0.0, now - rec.updated)
        return rec.score * math.pow(0.5, elapsed / self.policy.half_life)

    @staticmethod
    def _banned(rec: _Record, now: float) -> bool:
        return rec.banned_until is not None and now < rec.banned_until


def _parse(data: Any) -> dict[bytes, _Record]:
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError("not a score book")
    if data.get("version") != _VERSION:
        raise ValueError(f"unsupported score book version {data.get('version')!r}")
    peers = data["peers"]
    if not isinstance(peers, dict):
        raise ValueError("peers must be a map")
    records = {}
    for name, entry in peers.items():
        banned_until, bans, events = entry["banned_until"], entry["bans"], entry["events"]
        if not _is_count(bans):
            raise ValueError(f"bad ban count for {name}")
        if not isinstance(events, dict) or not all(
            isinstance(k, str) and _is_count(v) for k, v in events.items()
        ):
            raise ValueError(f"bad event counts for {name}")
        records[PeerId.from_base58(name).to_bytes()] = _Record(
            score=_finite(entry["score"]),
            updated=_finite(entry["updated"]),
            banned_until=None if banned_until is None else _finite(banned_until),
            bans=bans,
            events=dict(events),
        )
    return records


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
