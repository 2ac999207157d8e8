"""Equivocation by a reducer: two signed results for the same chunk of the same round with
different payload digests (spec: protocol/averaging.md, "Equivocation proofs").

A ``ResultHeader`` names no recipient, so an honest reducer sends every member the same signed
header. Two valid headers from one reducer for the same run, round, group, span and chunk
whose digests differ can only come from a reducer that sent members different results: the
pair is a proof that any peer can check without having taken part in the round.

``ResultWitness`` keeps the headers seen in a round (ours and those other members forward) and
yields the proof on the first conflict; ``check_proof`` is what a peer that receives a proof
runs before it bans the reducer. Both are pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from dandelion_p2p.averaging.admission import Refusal
from dandelion_p2p.averaging.group import GroupSpec
from dandelion_p2p.averaging.messages import (
    AVERAGING,
    MAX_GROUP_SIZE,
    MAX_HEADER,
    ResultEcho,
    ResultHeader,
    verify_result,
)
from dandelion_p2p.averaging.partition import Partition
from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.reputation.book import SCORE_EVENT_OF, ScoreBook, ScoreEvent
from dandelion_p2p.wire import Message, RejectCode, decode, encode, invalid

MAX_PROOF = 2 * MAX_HEADER + 64
"""An encoded proof holds two encoded result headers and its envelope."""

MAX_WITNESSED_HEADERS = MAX_GROUP_SIZE * 64
"""Headers a witness keeps per round: a reducer cannot make us hold more by sending more."""


@AVERAGING.message(5)
class EquivocationProof(Message):
    """Two encoded ``ResultHeader`` envelopes signed by the same reducer for the same chunk
    of the same round, with different digests."""

    first: bytes
    second: bytes

    def check(self) -> None:
        for name, blob in (("first", self.first), ("second", self.second)):
            if not 0 < len(blob) <= MAX_HEADER:
                raise invalid(f"EquivocationProof.{name}: 1..{MAX_HEADER} bytes required")
        if self.first == self.second:
            raise invalid("EquivocationProof: the two headers are the same")


@dataclass(frozen=True, slots=True)
class Equivocation:
    """A checked proof: ``reducer`` signed both headers."""

    reducer: bytes
    run: bytes
    round: int
    span_index: int
    chunk_index: int
    proof: EquivocationProof


def _chunk_key(h: ResultHeader) -> tuple[bytes, bytes, int, bytes, int, int, int, int]:
    return (h.reducer, h.run, h.round, h.group_id, h.span_index, h.chunk_index, h.start, h.end)


def _decode_header(blob: bytes, name: str) -> ResultHeader:
    header = decode(blob, AVERAGING)
    if not isinstance(header, ResultHeader):
        raise ProtocolViolation(RejectCode.INVALID_FIELD, f"proof.{name} is not a ResultHeader")
    return header


def make_proof(first: ResultHeader, second: ResultHeader) -> EquivocationProof:
    return EquivocationProof(encode(first), encode(second))


def check_proof(proof: EquivocationProof) -> Equivocation:
    """The equivocation ``proof`` shows, or ``ProtocolViolation`` for a proof that shows none
    (``BAD_SIGNATURE`` when a header is not signed by the reducer it names, ``INVALID_FIELD``
    when the headers are for different chunks or agree on the digest): a forged proof is the
    sender's fault and is scored as such."""
    proof.check()
    a = _decode_header(proof.first, "first")
    b = _decode_header(proof.second, "second")
    if _chunk_key(a) != _chunk_key(b):
        raise ProtocolViolation(
            RejectCode.INVALID_FIELD, "proof headers are not for the same reducer and chunk"
        )
    if a.digest == b.digest:
        raise ProtocolViolation(RejectCode.INVALID_FIELD, "proof headers agree on the digest")
    if not (verify_result(a) and verify_result(b)):
        raise ProtocolViolation(
            RejectCode.BAD_SIGNATURE, "a proof header is not signed by its reducer"
        )
    return Equivocation(a.reducer, a.run, a.round, a.span_index, a.chunk_index, proof)


class ResultWitness:
    """The signed result headers seen in one round, by chunk; at most one kept per chunk.

    Callers pass only headers whose signature they checked (``verify_result``) or that came
    from ``Admission``: an unsigned header here would let a forger frame a reducer.
    """

    def __init__(self, max_headers: int = MAX_WITNESSED_HEADERS) -> None:
        self._max_headers = max_headers
        self._seen: dict[tuple[bytes, bytes, int, bytes, int, int, int, int], ResultHeader] = {}
        self.dropped = 0

    def observe(self, header: ResultHeader) -> EquivocationProof | None:
        """Remember ``header``; a proof if its reducer signed another digest for its chunk."""
        key = _chunk_key(header)
        earlier = self._seen.get(key)
        if earlier is None:
            if len(self._seen) >= self._max_headers:
                self.dropped += 1
                return None
            self._seen[key] = header
            return None
        if earlier.digest == header.digest:
            return None
        return make_proof(earlier, header)

    def holds(self, header: ResultHeader) -> bool:
        """Whether this very header (its signature included) is the one kept for its chunk:
        it was checked when it was kept, so a copy of it needs no second check."""
        return self._seen.get(_chunk_key(header)) == header

    @property
    def held(self) -> int:
        return len(self._seen)

    def digests(self) -> dict[tuple[int, int], bytes]:
        """Per (span, chunk), the digest first seen: what a member tells the others it got."""
        return {(k[4], k[5]): h.digest for k, h in self._seen.items()}


def decode_proof(blob: bytes) -> EquivocationProof:
    """A proof received from a peer, its size checked before anything is decoded; raises
    ``ProtocolViolation``. The proof is not checked yet: ``check_proof`` does that."""
    if len(blob) > MAX_PROOF:
        raise ProtocolViolation(RejectCode.TOO_LARGE, f"proof of {len(blob)} bytes")
    proof = decode(blob, AVERAGING)
    if not isinstance(proof, EquivocationProof):
        raise ProtocolViolation(RejectCode.UNKNOWN_TYPE, "not an EquivocationProof")
    return proof


MAX_KEPT_PROOFS = 8
"""Proofs a round keeps for its report: one per equivocating reducer, and a group with more
than a few has no honest majority to protect anyway."""


class EchoExchange:
    """One member's side of the echoes of one round: the result headers the other members
    applied, compared with ours in a ``ResultWitness``, and which members have not yet said
    they echo nothing more (the round waits for them, as for a result)."""

    def __init__(self, spec: GroupSpec, partition: Partition, peer_id: bytes) -> None:
        self._spec = spec
        self._partition = partition
        self.witness = ResultWitness()
        self.awaited: set[bytes] = {p for p in spec.peer_ids if p != peer_id}
        self.proofs: dict[bytes, EquivocationProof] = {}
        self._caught: set[bytes] = set()

    def on_echo(
        self, sender: bytes, echo: ResultEcho, payload: memoryview
    ) -> Refusal | bytes | None:
        """Refused, a reducer newly caught equivocating, or nothing to act on."""
        if (echo.run, echo.round, echo.group_id) != (
            self._spec.run,
            self._spec.round,
            self._spec.group_id,
        ):
            return Refusal(RejectCode.UNEXPECTED, "echo of another round or group")
        if echo.final:
            self.awaited.discard(sender)
            return None
        try:
            header = decode(bytes(payload), AVERAGING)
        except ProtocolViolation as exc:
            return Refusal(exc.code, f"echoed header: {exc.detail}")
        if not isinstance(header, ResultHeader):
            return Refusal(RejectCode.INVALID_FIELD, "echo of something not a result header")
        if (header.run, header.round, header.group_id) != (echo.run, echo.round, echo.group_id):
            return Refusal(RejectCode.INVALID_FIELD, "echoed result of another round or group")
        spans = self._partition.spans
        if not (
            header.span_index < len(spans) and spans[header.span_index].peer_id == header.reducer
        ):
            return Refusal(RejectCode.INVALID_FIELD, "echoed result from a non-reducer")
        # Most echoes repeat the header this member applied, byte for byte: with n members
        # that is n - 2 copies of every result (every member but this one and the reducer
        # echoes it), and checking each signature again was most of the verification a
        # round cost.
        if self.witness.holds(header):
            return None
        if not verify_result(header):
            return Refusal(
                RejectCode.BAD_SIGNATURE, "echoed result signature", ScoreEvent.BAD_SIGNATURE
            )
        return self.observe(header)

    def observe(self, header: ResultHeader) -> bytes | None:
        """A checked header (one we applied or one echoed to us); its reducer, the first time
        it is caught."""
        proof = self.witness.observe(header)
        if proof is None or header.reducer in self._caught:
            return None
        self._caught.add(header.reducer)
        if len(self.proofs) < MAX_KEPT_PROOFS:
            self.proofs[header.reducer] = proof
        return header.reducer


def accept_proof(book: ScoreBook, sender: bytes, blob: bytes, now: float) -> bytes | None:
    """A proof ``sender`` passed us, whether or not we took part in its round: the reducer it
    proves equivocating is scored ``EQUIVOCATION`` (a ban) and returned; a proof that proves
    nothing scores ``sender`` by its reject code and accuses no one."""
    try:
        reducer = check_proof(decode_proof(blob)).reducer
    except ProtocolViolation as exc:
        book.record(sender, SCORE_EVENT_OF.get(exc.code, ScoreEvent.MALFORMED), now)
        return None
    book.record(reducer, ScoreEvent.EQUIVOCATION, now)
    return reducer
