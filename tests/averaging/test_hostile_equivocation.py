"""A reducer that signs one result for some members and another for the rest: the two
signed headers are a proof that any peer checks and bans on, and a forged proof is refused
and scores its sender."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dandelion_p2p.averaging import messages as m
from dandelion_p2p.averaging.allreduce import Send
from dandelion_p2p.averaging.equivocation import (
    MAX_PROOF,
    EquivocationProof,
    ResultWitness,
    accept_proof,
    check_proof,
    decode_proof,
    make_proof,
)
from dandelion_p2p.averaging.messages import ResultHeader, pack_frame, payload_digest, unpack_frame
from dandelion_p2p.averaging.report import ChunkStatus, ExclusionReason
from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.identity import Identity
from dandelion_p2p.reputation.book import SCORE_EVENT_OF, ScoreBook, ScoreEvent
from dandelion_p2p.wire import RejectCode, decode, encode
from tests.averaging.test_allreduce import BY_ID, build, check_consistent

HONEST = Identity.from_seed(b"\x01" * 32)
REDUCER = Identity.from_seed(b"\x02" * 32)
FORGER = Identity.from_seed(b"\x03" * 32)
TRUE_VALUES = np.arange(1024, dtype=np.float32)
SHIFTED_VALUES = TRUE_VALUES + np.float32(3.0)


def result(values: np.ndarray, signer: Identity = REDUCER, **changes: object) -> ResultHeader:
    fields: dict[str, object] = dict(
        run=b"run",
        round=7,
        group_id=b"\x11" * 32,
        span_index=1,
        chunk_index=0,
        start=0,
        end=values.size,
        reducer=REDUCER.peer_id_bytes,
        contributors=tuple(sorted([HONEST.peer_id_bytes, REDUCER.peer_id_bytes])),
        weights=(1.0, 1.0),
        codec="none",
        digest=payload_digest(values.tobytes()),
    )
    fields.update(changes)
    return ResultHeader(**fields, signature=m.UNSIGNED).signed_with(signer.sign)  # type: ignore[arg-type]


def test_members_comparing_headers_catch_the_equivocation_and_a_bystander_bans() -> None:
    to_two_members = result(TRUE_VALUES)
    to_the_third = result(SHIFTED_VALUES)
    witness = ResultWitness()
    assert witness.observe(to_two_members) is None
    assert witness.observe(to_two_members) is None  # the same header again is no conflict
    proof = witness.observe(to_the_third)
    assert proof is not None, "conflicting signed results went unnoticed"

    # A peer that took part in nothing receives the encoded proof, checks it and bans.
    wire_bytes = encode(proof)
    bystander = ScoreBook()
    equivocation = check_proof(decode_proof(wire_bytes))
    started_ban = bystander.record(equivocation.reducer, ScoreEvent.EQUIVOCATION, now=100.0)
    shift = float(np.max(np.abs(SHIFTED_VALUES - TRUE_VALUES)))
    assert started_ban and bystander.is_banned(REDUCER.peer_id_bytes, 100.0), (
        f"proof of {len(wire_bytes)} bytes (limit {MAX_PROOF}), shift {shift} per element, "
        f"score {bystander.score(REDUCER.peer_id_bytes, 100.0)}"
    )
    print(
        f"\nequivocation on span {equivocation.span_index} chunk {equivocation.chunk_index} "
        f"round {equivocation.round}: +{shift} per element; proof {len(wire_bytes)} B "
        f"(limit {MAX_PROOF} B); bystander score "
        f"{bystander.score(REDUCER.peer_id_bytes, 100.0)}, banned"
    )


def _forged_proofs() -> list[tuple[str, EquivocationProof, RejectCode]]:
    genuine = result(TRUE_VALUES)
    # The forger cannot sign as the reducer: it re-signs a shifted header with its own key.
    framed = result(SHIFTED_VALUES, signer=FORGER)
    other_chunk = result(SHIFTED_VALUES, chunk_index=1)
    other_round = result(SHIFTED_VALUES, round=8)
    # The same digest under a different, valid field set is no equivocation of the payload.
    same_digest = result(TRUE_VALUES, weights=(1.0, 2.0))
    tampered = dataclasses.replace(genuine, digest=payload_digest(SHIFTED_VALUES.tobytes()))
    return [
        ("signature by another key", make_proof(genuine, framed), RejectCode.BAD_SIGNATURE),
        ("digest edited after signing", make_proof(genuine, tampered), RejectCode.BAD_SIGNATURE),
        ("different chunks", make_proof(genuine, other_chunk), RejectCode.INVALID_FIELD),
        ("different rounds", make_proof(genuine, other_round), RejectCode.INVALID_FIELD),
        ("same digest", make_proof(genuine, same_digest), RejectCode.INVALID_FIELD),
        (
            "not a result header",
            EquivocationProof(encode(genuine), encode(EquivocationProof(b"x", b"y"))),
            RejectCode.INVALID_FIELD,
        ),
    ]


@pytest.mark.parametrize(
    "name,proof,code", _forged_proofs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_a_forged_proof_is_refused_and_scores_its_sender(
    name: str, proof: EquivocationProof, code: RejectCode
) -> None:
    book = ScoreBook()
    with pytest.raises(ProtocolViolation) as refused:
        check_proof(decode_proof(encode(proof)))
    assert refused.value.code is code, f"{name}: refused with {refused.value.code}"
    assert accept_proof(book, FORGER.peer_id_bytes, encode(proof), 1.0) is None
    forger_events = book.standing(FORGER.peer_id_bytes, 1.0).events
    assert forger_events == {SCORE_EVENT_OF.get(code, ScoreEvent.MALFORMED).value: 1}
    assert not book.is_banned(REDUCER.peer_id_bytes, 1.0), f"{name}: the reducer was framed"
    assert book.score(FORGER.peer_id_bytes, 1.0) < 0, f"{name}: the forger was not scored"


def test_an_oversized_proof_is_refused_before_decoding() -> None:
    with pytest.raises(ProtocolViolation) as refused:
        decode_proof(b"\x00" * (MAX_PROOF + 1))
    assert refused.value.code is RejectCode.TOO_LARGE


def test_the_witness_holds_a_bounded_number_of_headers() -> None:
    witness = ResultWitness(max_headers=100)
    for round_ in range(250):
        witness.observe(result(TRUE_VALUES, round=round_))
    assert (witness.held, witness.dropped) == (100, 150)


# ----------------------------------------------------------- the round, end to end

SHIFT = np.float32(3.0)


def equivocate_to(reducer: bytes, victim: bytes):
    """The reducer sends ``victim`` its results shifted by +3.0 per element, digested and
    re-signed properly; every other member gets the true ones."""

    def tamper(src: bytes, send: Send, frame: bytes) -> bytes | None:
        if src != reducer or send.kind != "result" or send.recipient != victim:
            return frame
        header, payload = unpack_frame(frame)
        assert isinstance(header, ResultHeader)
        shifted = (np.frombuffer(bytes(payload), dtype="<f4") + SHIFT).astype("<f4").tobytes()
        forged = dataclasses.replace(header, digest=payload_digest(shifted), signature=m.UNSIGNED)
        return b"".join(pack_frame(forged.signed_with(BY_ID[reducer].sign), shifted))

    return tamper


@pytest.mark.parametrize("n", [3, 5])
def test_an_equivocating_reducer_is_caught_by_every_member_in_the_round(n: int) -> None:
    swarm = build(n, size=6000, bandwidths=[100.0] * n, seed=n)
    reducers = [p for p in swarm.spec.partition(6000).reducers]
    cheat, victim = reducers[0], reducers[-1]
    swarm.net.tamper = equivocate_to(cheat, victim)
    swarm.net.start()
    swarm.net.run()
    check_consistent(swarm)

    honest = [p for p in swarm.spec.peer_ids if p != cheat]
    span = swarm.spec.partition(6000).span_of(cheat)
    span_index = swarm.spec.index_of(cheat)
    cheat_span = slice(span.start, span.end)
    rest = np.ones(6000, dtype=bool)
    rest[cheat_span] = False
    first = swarm.buffers[honest[0]]
    spread = max(float(np.max(np.abs(swarm.buffers[p][rest] - first[rest]))) for p in honest)
    bystander = ScoreBook()
    for peer in honest:
        rep = swarm.peers[peer].report()
        reasons = {(e.role, e.reason) for e in rep.excluded if e.peer == cheat}
        statuses = {c.status for c in rep.spans[span_index].chunks}
        assert ("reducer", ExclusionReason.EQUIVOCATION) in reasons and statuses == {
            ChunkStatus.LOCAL
        }, f"{peer[-4:].hex()}: exclusions {reasons}, span {span_index} {statuses}"
        np.testing.assert_array_equal(
            swarm.buffers[peer][cheat_span], swarm.originals[peer][cheat_span]
        )
        assert (cheat, ScoreEvent.EQUIVOCATION) in swarm.events(peer)
        assert not rep.complete and rep.equivocation_proofs
        # A peer outside the group, handed the proof by this member, bans on it alone.
        assert accept_proof(bystander, peer, rep.equivocation_proofs[0], now=1.0) == cheat
    assert spread == 0.0, f"honest members differ by up to {spread} outside span {span_index}"
    assert bystander.is_banned(cheat, 1.0)
    print(
        f"\nn={n}: reducer of span {span_index} [{span.start}, {span.end}) sent +{SHIFT} to one "
        f"member; caught by {len(honest)}/{len(honest)} honest members in the round; that span "
        f"fell back to local values on each; max abs difference between honest vectors "
        f"elsewhere {spread}; bystander banned it on a {len(rep.equivocation_proofs[0])}-byte proof"
    )


@pytest.mark.parametrize("digest", ["altered", "kept"])
def test_a_member_echoing_forged_headers_cannot_frame_an_honest_reducer(digest: str) -> None:
    """Re-signed by the liar, with an altered digest or with the true one (a header equal to
    the applied one but for its signature is checked, not taken for a copy of it)."""
    n = 4
    swarm = build(n, size=6000, bandwidths=[100.0] * n, seed=11)
    liar = swarm.spec.peer_ids[1]

    def forge_echoes(src: bytes, send: Send, frame: bytes) -> bytes | None:
        if src != liar or send.kind != "echo":
            return frame
        echo, payload = unpack_frame(frame)
        if not payload.nbytes:
            return frame
        header = decode(bytes(payload), m.AVERAGING)
        assert isinstance(header, ResultHeader)
        # The liar cannot sign as the reducer: it signs the altered header itself.
        forged = dataclasses.replace(
            header, digest=bytes(32) if digest == "altered" else header.digest,
            signature=m.UNSIGNED)
        return b"".join(pack_frame(echo, encode(forged.signed_with(BY_ID[liar].sign))))

    swarm.net.tamper = forge_echoes
    swarm.net.start()
    swarm.net.run()
    check_consistent(swarm)
    for peer in swarm.spec.peer_ids:
        if peer == liar:
            continue
        rep = swarm.peers[peer].report()
        refused = [v.code for v in rep.violations if v.peer == liar]
        assert rep.complete and not rep.equivocation_proofs, rep.excluded
        assert refused and set(refused) == {"BAD_SIGNATURE"}, refused
        assert (liar, ScoreEvent.BAD_SIGNATURE) in swarm.events(peer)


def test_an_echo_of_the_header_a_member_holds_is_not_checked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every member but the reducer echoes each result header to the others: checked once
    per chunk, the copies of a header already held cost a comparison, not a signature
    check."""
    from dandelion_p2p.averaging import equivocation

    checked: list[ResultHeader] = []

    def counting(header: ResultHeader) -> bool:
        checked.append(header)
        return m.verify_result(header)

    monkeypatch.setattr(equivocation, "verify_result", counting)
    n = 6
    swarm = build(n, size=6000, bandwidths=[100.0] * n, seed=5)
    echoed: list[tuple[int, int]] = []

    def count_echoes(src: bytes, send: Send, frame: bytes) -> bytes | None:
        payload = unpack_frame(frame)[1]
        if send.kind == "echo" and payload.nbytes:
            header = decode(bytes(payload), m.AVERAGING)
            assert isinstance(header, ResultHeader)
            echoed.append((header.span_index, header.chunk_index))
        return frame

    swarm.net.tamper = count_echoes
    swarm.net.start()
    swarm.net.run()
    check_consistent(swarm)
    assert all(swarm.peers[p].report().complete for p in swarm.spec.peer_ids)
    # Each echoed header was checked at most once per member (the first copy, when it came
    # before the result itself): at most a member's share, not every copy.
    once_per_member = len(set(echoed)) * n
    assert len(checked) <= once_per_member < len(echoed), (len(checked), once_per_member,
                                                             len(echoed))
