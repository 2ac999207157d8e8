"""What one all-reduce round records about the other peers, apart from the vector itself.

The ledger is written by every role of ``AllReducePeer`` (the reducer of our span, the
receiver of the other spans' results, the frame checks) and read into the ``RoundReport``:
which members were cut off, in which role and why; the score events for the caller's
``ScoreBook``; the frames refused and the rejects received; the bytes moved. It decides
nothing about chunks.
"""

from __future__ import annotations

from dandelion_p2p.averaging.report import ExcludedPeer, Role, Violation
from dandelion_p2p.reputation.book import ScoreEvent
from dandelion_p2p.wire import RejectCode

MAX_REPORTED_VIOLATIONS = 256


class RoundLedger:
    """Exclusions, score events, violations and byte counts of one round."""

    def __init__(self) -> None:
        self.gone: set[bytes] = set()
        """Members reported failed, banned or of another view of the group: nothing more is
        sent to them this round."""
        self._excluded: list[ExcludedPeer] = []
        self._excluded_roles: set[tuple[bytes, Role]] = set()
        self._events: list[tuple[bytes, ScoreEvent]] = []
        self._penalized: set[bytes] = set()
        self._timeout_scored: set[bytes] = set()
        self._violations: list[Violation] = []
        self._violations_dropped = 0
        self._rejects_received: list[Violation] = []
        self.bytes_sent = 0
        self.bytes_received = 0

    # ------------------------------------------------------------------------ exclusions

    def add_exclusion(self, exclusion: ExcludedPeer) -> None:
        """Record that ``exclusion.peer`` stopped counting in ``exclusion.role``; only the
        first exclusion per peer and role is kept."""
        key = (exclusion.peer, exclusion.role)
        if key not in self._excluded_roles:
            self._excluded_roles.add(key)
            self._excluded.append(exclusion)

    def was_excluded(self, peer: bytes) -> bool:
        """Whether ``peer`` was excluded in any role this round."""
        return any(p == peer for p, _ in self._excluded_roles)

    @property
    def excluded(self) -> tuple[ExcludedPeer, ...]:
        return tuple(self._excluded)

    # ---------------------------------------------------------------------------- scores

    def event(self, peer: bytes, event: ScoreEvent) -> None:
        self._events.append((peer, event))
        if event is not ScoreEvent.SUCCESS:
            self._penalized.add(peer)

    def score_timeout(self, peer: bytes) -> None:
        """One ``TIMEOUT`` per peer and round, however many roles it failed in."""
        if peer not in self._timeout_scored:
            self._timeout_scored.add(peer)
            self.event(peer, ScoreEvent.TIMEOUT)

    def was_penalized(self, peer: bytes) -> bool:
        return peer in self._penalized

    @property
    def events(self) -> list[tuple[bytes, ScoreEvent]]:
        return list(self._events)

    # ------------------------------------------------------------------------ violations

    def record_violation(self, peer: bytes, code: RejectCode, detail: str, now: float) -> None:
        """A frame refused from ``peer``; beyond ``MAX_REPORTED_VIOLATIONS`` only counted."""
        if len(self._violations) < MAX_REPORTED_VIOLATIONS:
            self._violations.append(Violation(peer, code.name, detail, now))
        else:
            self._violations_dropped += 1

    def record_reject(self, peer: bytes, code: int, detail: str, now: float) -> None:
        """A ``Reject`` that ``peer`` sent about one of our frames."""
        if len(self._rejects_received) < MAX_REPORTED_VIOLATIONS:
            self._rejects_received.append(Violation(peer, _code_name(code), detail, now))

    @property
    def violations(self) -> tuple[Violation, ...]:
        return tuple(self._violations)

    @property
    def violations_dropped(self) -> int:
        return self._violations_dropped

    @property
    def rejects_received(self) -> tuple[Violation, ...]:
        return tuple(self._rejects_received)

    # ----------------------------------------------------------------------------- bytes

    def count_sent(self, nbytes: int) -> None:
        self.bytes_sent += nbytes

    def count_received(self, nbytes: int) -> None:
        self.bytes_received += nbytes


def _code_name(code: int) -> str:
    try:
        return RejectCode(code).name
    except ValueError:
        return f"code {code}"
