"""Equivocation proofs shared through the DHT, so that peers which took no part in a round ban
its equivocating reducer too (spec: protocol/averaging.md, "Proofs in the DHT").

Records live under namespace ``avg-proof``, key = the averaging run (``group_run_key``), one
per reporter (the DHT keeps the newest record per publisher), signed by the reporter; the value
is one encoded ``EquivocationProof``. The namespace's validator checks the proof itself, so a
DHT server stores no record whose proof does not verify, and a peer that tries to store one is
scored by that server like any other violation.

The pure part (the validator, which proof a member publishes, which proofs are new) sits above
``ProofExchange``, the small adapter that publishes a round's proof and fetches the others'.
Proofs carry no time of their own: anyone may republish a valid proof, and a reducer that
signed two results for one chunk stays banned wherever the proof is read.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Sequence

import blake3

from dandelion_p2p.averaging.equivocation import check_proof, decode_proof
from dandelion_p2p.averaging.ports import PeerReputation, RecordStore
from dandelion_p2p.errors import DandelionError, ProtocolViolation
from dandelion_p2p.net.dht.messages import MAX_VALUE
from dandelion_p2p.net.dht.records import NamespacePolicy, RecordValidator
from dandelion_p2p.reputation.book import SCORE_EVENT_OF, ScoreEvent

log = logging.getLogger(__name__)

PROOF_NAMESPACE = "avg-proof"
PROOF_TTL_S = 3600.0
"""How long a published proof stays in the DHT (and the namespace's maximum TTL)."""
MAX_PROOFS_CHECKED_PER_FETCH = 64
"""New proofs one fetch verifies (two signatures each); the rest wait for the next fetch."""
MAX_REMEMBERED_PROOFS = 4096
"""Proofs already applied, so that one proof bans its reducer once, not at every fetch."""
DEFAULT_FETCH_INTERVAL_S = 10.0
"""Fetches closer together than this (rounds retried in a loop) are skipped."""


def check_proof_value(value: bytes) -> bytes:
    """The reducer the record value ``value`` proves equivocating; ``ProtocolViolation`` for
    anything else (a value over ``MAX_VALUE``, not a proof, or a proof that proves nothing)."""
    return check_proof(decode_proof(value)).reducer


def register_namespace(validator: RecordValidator) -> None:
    """``avg-proof``, on every node: a DHT server keeps proofs whether or not it averages."""

    def check(value: bytes) -> None:
        check_proof_value(value)

    validator.register(
        PROOF_NAMESPACE, NamespacePolicy(max_ttl_ms=int(PROOF_TTL_S * 1000), check_value=check)
    )


def proof_to_publish(
    proofs: Sequence[bytes], members: Sequence[bytes], me: bytes
) -> bytes | None:
    """The one proof of a round that ``me`` publishes (a reporter holds one record per run).

    Every honest member of the group catches every equivocating reducer, so members take the
    proofs in turn by their place in the group: with more honest members than proofs, each
    proof is published by someone. Proofs too large for a DHT record are left out.
    """
    fitting = sorted(p for p in proofs if len(p) <= MAX_VALUE)
    if not fitting:
        return None
    place = members.index(me) if me in members else 0
    return fitting[place % len(fitting)]


class SeenProofs:
    """Digests of the proofs already applied, oldest forgotten first beyond ``limit``."""

    def __init__(self, limit: int = MAX_REMEMBERED_PROOFS) -> None:
        self._limit = limit
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    @staticmethod
    def digest(value: bytes) -> bytes:
        return blake3.blake3(value).digest()

    def __contains__(self, value: bytes) -> bool:
        return self.digest(value) in self._seen

    def add(self, value: bytes) -> None:
        self._seen[self.digest(value)] = None
        self._seen.move_to_end(self.digest(value))
        while len(self._seen) > self._limit:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


class ProofExchange:
    """Publishes this peer's proofs of run ``run`` and applies everyone else's to the node's
    score book (through ``reputation.record_score``, the path that persists bans)."""

    def __init__(
        self,
        records: RecordStore,
        reputation: PeerReputation,
        run: bytes,
        *,
        dht_timeout: float = 2.0,
        fetch_interval: float = DEFAULT_FETCH_INTERVAL_S,
    ) -> None:
        self.records = records
        self.reputation = reputation
        self.run = run
        self.dht_timeout = dht_timeout
        self.fetch_interval = fetch_interval
        self.seen = SeenProofs()
        self._last_fetch = -float("inf")

    async def publish(self, proofs: Sequence[bytes], members: Sequence[bytes], me: bytes) -> int:
        """Publish this peer's share of a finished round's ``proofs``; how many DHT servers
        stored it (0 when there was nothing to publish or the DHT could not be reached)."""
        value = proof_to_publish(proofs, members, me)
        if value is None:
            return 0
        self.seen.add(value)
        try:
            return await self.records.put(
                PROOF_NAMESPACE, self.run, value, PROOF_TTL_S, keep=False,
                timeout=self.dht_timeout,
            )
        except DandelionError as exc:
            log.info("equivocation proof not published: %s", exc)
            return 0

    @property
    def fetched(self) -> bool:
        """Whether a read was made (whatever it found)."""
        return self._last_fetch > -float("inf")

    def age(self) -> float:
        """Seconds since the last read began (infinite before the first)."""
        return time.monotonic() - self._last_fetch

    def due_in(self) -> float:
        """Seconds until the next read is due: a whole interval before the first."""
        if not self.fetched:
            return self.fetch_interval
        return max(0.0, self._last_fetch + self.fetch_interval - time.monotonic())

    async def fetch(self, *, force: bool = False) -> list[bytes]:
        """Read the run's proofs and score the reducers of the new valid ones ``EQUIVOCATION``
        (a ban); returns those reducers. Skipped (empty) within ``fetch_interval`` of the
        last fetch unless ``force``."""
        now = time.monotonic()
        if not force and now - self._last_fetch < self.fetch_interval:
            return []
        self._last_fetch = now
        try:
            records = await self.records.get(PROOF_NAMESPACE, self.run, timeout=self.dht_timeout)
        except DandelionError as exc:
            log.info("equivocation proofs not read: %s", exc)
            return []
        # Several reporters may publish the same proof: each distinct value is checked once.
        fresh = list({r.value: r for r in records if r.value not in self.seen}.values())
        # The DHT answers by turns between networks; a random pick among what is left keeps a
        # flood of cheap self-made proofs from always coming first.
        random.shuffle(fresh)
        banned: list[bytes] = []
        for record in fresh[:MAX_PROOFS_CHECKED_PER_FETCH]:
            self.seen.add(record.value)
            try:
                reducer = check_proof_value(record.value)
            except ProtocolViolation as exc:
                # The DHT validated the record, so only a peer with other rules gets here: the
                # publisher signed the record and answers for it.
                self.reputation.record_score(
                    record.publisher, SCORE_EVENT_OF.get(exc.code, ScoreEvent.MALFORMED)
                )
                continue
            if reducer in banned:
                continue
            # Scored even when already banned for something else: its score then carries the
            # equivocation past the end of that ban.
            self.reputation.record_score(reducer, ScoreEvent.EQUIVOCATION)
            banned.append(reducer)
        if banned:
            log.warning("banned %d reducers on equivocation proofs from the DHT", len(banned))
        return banned
