"""Iterative Kademlia lookup as a state machine: the caller performs the queries it asks for."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from dandelion_p2p.net.dht.messages import PeerRef
from dandelion_p2p.net.dht.records import node_key


class QueryState(Enum):
    WAITING = "waiting"
    IN_FLIGHT = "in-flight"
    ANSWERED = "answered"
    FAILED = "failed"


@dataclass
class Candidate:
    ref: PeerRef
    distance: int
    state: QueryState = QueryState.WAITING


class Lookup:
    """Finds the ``width`` closest reachable peers to ``target``.

    The lookup is finished when the ``width`` closest candidates that have not failed have all
    answered, or when nobody is left to ask. At most ``alpha`` queries are in flight at once,
    and only candidates among the current ``width`` closest are asked, so a lookup does not
    wander off to far peers while close ones are pending.
    """

    def __init__(
        self,
        target: bytes,
        seeds: list[PeerRef],
        *,
        local_peer_id: bytes,
        width: int,
        alpha: int,
        max_candidates: int = 256,
    ) -> None:
        self.target = target
        self.target_int = int.from_bytes(target, "big")
        self.local_peer_id = local_peer_id
        self.width = width
        self.alpha = alpha
        self.max_candidates = max_candidates
        self._candidates: dict[bytes, Candidate] = {}
        self.add(seeds)

    def _distance(self, peer_id: bytes) -> int:
        return int.from_bytes(node_key(peer_id), "big") ^ self.target_int

    def add(self, refs: list[PeerRef] | tuple[PeerRef, ...]) -> None:
        for ref in refs:
            if ref.peer_id == self.local_peer_id:
                continue
            held = self._candidates.get(ref.peer_id)
            if held is None:
                self._candidates[ref.peer_id] = Candidate(ref, self._distance(ref.peer_id))
            elif ref.addrs and not held.ref.addrs:
                held.ref = ref
        if len(self._candidates) > self.max_candidates:
            # Drop the farthest peers nobody is waiting on.
            ordered = sorted(self._candidates.values(), key=lambda c: c.distance)
            for c in ordered[self.max_candidates :]:
                if c.state is not QueryState.IN_FLIGHT:
                    del self._candidates[c.ref.peer_id]

    def _live_closest(self) -> list[Candidate]:
        live = [c for c in self._candidates.values() if c.state is not QueryState.FAILED]
        live.sort(key=lambda c: c.distance)
        return live[: self.width]

    def next_queries(self) -> list[PeerRef]:
        """Candidates to query now; each is marked in flight."""
        in_flight = sum(1 for c in self._candidates.values() if c.state is QueryState.IN_FLIGHT)
        budget = self.alpha - in_flight
        chosen: list[PeerRef] = []
        for c in self._live_closest():
            if budget <= 0:
                break
            if c.state is QueryState.WAITING:
                c.state = QueryState.IN_FLIGHT
                chosen.append(c.ref)
                budget -= 1
        return chosen

    def on_reply(self, peer_id: bytes, closer: list[PeerRef] | tuple[PeerRef, ...]) -> None:
        c = self._candidates.get(peer_id)
        if c is not None:
            c.state = QueryState.ANSWERED
        self.add(closer)

    def on_failure(self, peer_id: bytes) -> None:
        c = self._candidates.get(peer_id)
        if c is not None:
            c.state = QueryState.FAILED

    @property
    def finished(self) -> bool:
        return all(c.state is QueryState.ANSWERED for c in self._live_closest())

    @property
    def in_flight(self) -> int:
        return sum(1 for c in self._candidates.values() if c.state is QueryState.IN_FLIGHT)

    def closest_settled(self, count: int) -> list[bytes] | None:
        """The ``count`` closest candidates that have not failed, once all have answered;
        None while any of them is still to be asked or answering."""
        closest = self._live_closest()[:count]
        if len(closest) < count or any(c.state is not QueryState.ANSWERED for c in closest):
            return None
        return [c.ref.peer_id for c in closest]

    def closest_answered(self) -> list[PeerRef]:
        return [c.ref for c in self._live_closest() if c.state is QueryState.ANSWERED]
