"""State transfer's core without a network or files: a server's answers from a fake set of
checkpoints, and a joiner's offers, choice and chunk plan pushed through message by message."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.sync.statesync_core import (
    CHUNK,
    MANIFEST,
    PASSES,
    STATE,
    FileFetch,
    OfferRound,
    StateChunk,
    StateOffer,
    StateOffered,
    StateRead,
    StateUnavailable,
    answer,
    offer_of,
    robust_step,
)
from dandelion_p2p.wire import Reject, RejectCode, decode, encode

RUN = "tiny-00112233445566778899aabb"


@dataclass
class Listed:
    step: int
    files: dict[str, tuple[int, str]]
    data: dict[str, bytes] = field(default_factory=dict)


class FakeCheckpoints:
    def __init__(self, *listed: Listed) -> None:
        self.by_step = {c.step: c for c in listed}

    def newest(self) -> Listed | None:
        return self.by_step[max(self.by_step)] if self.by_step else None

    def at_step(self, step: int) -> Listed | None:
        return self.by_step.get(step)

    def read(self, listing: Listed, name: str, offset: int, length: int) -> bytes:
        return listing.data[name][offset:offset + length]


def checkpoint(step: int, weights: bytes = b"w" * 10) -> Listed:
    data = {"trainable.safetensors": weights, MANIFEST: b"{}"}
    return Listed(step, {n: (len(d), f"hash-{d[:1].hex()}-{len(d)}") for n, d in data.items()},
                  data)


def offered(step: int, **hashes: str) -> StateOffered:
    names = ("trainable.safetensors", "outer.safetensors", "optimizer.pt")
    digests = tuple(hashes.get(n.split(".")[0], n) for n in names)
    return StateOffered(run=RUN, step=step, names=names, sizes=(3 * CHUNK + 5, 10, 20),
                        hashes=digests)


def test_the_server_offers_its_newest_and_reads_any_kept_checkpoint() -> None:
    here = FakeCheckpoints(checkpoint(3, b"old" * 4), checkpoint(6))
    offer = answer(StateOffer(run=RUN), RUN, here)
    assert isinstance(offer, StateOffered) and offer.step == 6
    assert offer.files()["trainable.safetensors"][0] == 10
    assert answer(StateOffer(run="other"), RUN, here) == StateOffered(run="other", step=-1)
    assert answer(StateOffer(run=RUN), RUN, FakeCheckpoints()) == offer_of(RUN, None)
    chunk = answer(StateRead(run=RUN, step=3, name="trainable.safetensors", offset=3,
                             length=CHUNK), RUN, here)
    assert chunk == StateChunk(data=b"oldoldold")


@pytest.mark.parametrize(("request_", "code"), [
    (StateRead(run=RUN, step=4, name="trainable.safetensors", offset=0, length=1),
     RejectCode.NOT_FOUND),
    (StateRead(run=RUN, step=6, name="secret.txt", offset=0, length=1), RejectCode.NOT_FOUND),
    (StateRead(run="other", step=6, name="trainable.safetensors", offset=0, length=1),
     RejectCode.NOT_FOUND),
    (StateRead(run=RUN, step=6, name="trainable.safetensors", offset=10, length=1),
     RejectCode.INVALID_FIELD),
    (StateChunk(data=b""), RejectCode.UNKNOWN_TYPE),
    (Reject(code=RejectCode.INTERNAL, detail=""), RejectCode.UNKNOWN_TYPE),
])
def test_the_server_refuses_with_the_code_the_spec_names(request_: object,
                                                          code: RejectCode) -> None:
    with pytest.raises(ProtocolViolation) as info:
        answer(request_, RUN, FakeCheckpoints(checkpoint(6)))  # type: ignore[arg-type]
    assert info.value.code == code


def test_messages_cross_the_wire_unchanged() -> None:
    for msg in (StateOffer(run=RUN), offered(5),
                StateRead(run=RUN, step=5, name="outer.safetensors", offset=CHUNK, length=7),
                StateChunk(data=b"\x00" * 100)):
        assert decode(encode(msg), STATE) == msg


def test_the_joiner_takes_the_newest_offer_from_every_peer_holding_it() -> None:
    offers: OfferRound[str] = OfferRound(RUN, have_step=4)
    assert offers.request() == StateOffer(run=RUN)
    offers.received("slow", offered(9))
    offers.received("old", offered(4))
    offers.received("none", StateOffered(run=RUN, step=-1))
    offers.received("other-run", StateOffered(run="x", step=50))
    offers.received("rejected", Reject(code=RejectCode.FORBIDDEN, detail="banned"))
    offers.received("silent", None)
    offers.received("fast", offered(9))
    offers.received("behind", offered(6))
    chosen = offers.choose(asked=8)
    assert (chosen.step, chosen.reference, list(chosen.offers)) == (9, "slow", ["slow", "fast"])
    assert list(chosen.files()) == ["trainable.safetensors", "outer.safetensors",
                                    "optimizer.pt"]
    assert chosen.sources_of("optimizer.pt") == ["slow", "fast"]


def test_the_joiner_gives_up_without_a_newer_offer_or_when_sources_disagree() -> None:
    nothing: OfferRound[str] = OfferRound(RUN, have_step=9)
    nothing.received("a", offered(9))
    nothing.received("b", None)
    with pytest.raises(StateUnavailable, match=r"newer than step 9 \(1 of 3 asked") as info:
        nothing.choose(asked=3)
    assert not info.value.retry

    split: OfferRound[str] = OfferRound(RUN, have_step=-1)
    split.received("a", offered(9, trainable="x"))
    split.received("b", offered(9, trainable="y"))
    with pytest.raises(StateUnavailable, match=r"disagree on trainable\.safetensors"):
        split.choose(asked=2)

    # Files that may differ between peers (the inner optimizer) only narrow the sources.
    mixed: OfferRound[str] = OfferRound(RUN, have_step=-1)
    mixed.received("a", offered(9, optimizer="p"))
    mixed.received("b", offered(9, optimizer="q"))
    assert mixed.choose(asked=2).sources_of("optimizer.pt") == ["a"]


def test_a_file_is_read_in_chunks_spread_over_its_sources_and_retried() -> None:
    size = 3 * CHUNK + 5
    fetch: FileFetch[str] = FileFetch(RUN, 9, "trainable.safetensors", size, ["a", "b"])
    assert fetch.in_flight == 8
    first = fetch.next_pass()
    assert [(peer, read.offset, read.length) for peer, read in first] == [
        ("a", 0, CHUNK), ("b", CHUNK, CHUNK), ("a", 2 * CHUNK, CHUNK), ("b", 3 * CHUNK, 5)]
    assert all(read.run == RUN and read.step == 9 for _, read in first)
    (_, r0), (_, r1), (_, r2), _ = first
    assert fetch.received(r0, StateChunk(data=b"x" * CHUNK)) == b"x" * CHUNK
    assert fetch.received(r1, StateChunk(data=b"short")) is None, "a wrong length is refused"
    assert fetch.received(r2, offered(9)) is None, "another type leaves the chunk missing"
    fetch.failed("b")
    fetch.failed("a")  # the last source is kept
    assert fetch.alive == ["a"] and not fetch.complete
    second = fetch.next_pass()
    assert [(peer, read.offset) for peer, read in second] == [
        ("a", CHUNK), ("a", 2 * CHUNK), ("a", 3 * CHUNK)]
    for _, read in second:
        fetch.received(read, StateChunk(data=b"y" * read.length))
    assert fetch.complete and fetch.next_pass() == []


def test_a_file_no_source_serves_fails_after_its_passes() -> None:
    fetch: FileFetch[str] = FileFetch(RUN, 9, "outer.safetensors", 10, ["a"])
    passes = 0
    while fetch.next_pass():
        passes += 1
        fetch.failed("a")
    assert passes == PASSES and not fetch.complete
    empty: FileFetch[str] = FileFetch(RUN, 9, "empty.pt", 0, ["a"])
    assert empty.next_pass() == [] and empty.complete, "a zero-length file needs no read"


def test_the_swarm_step_is_the_median_claim() -> None:
    assert robust_step([]) == -1
    assert robust_step([7, 2**52, 9]) == 9


def test_a_peer_that_joined_without_the_writers_files_agrees_with_those_that_hold_them() -> None:
    # It offers the outer optimizer's state alone: for a joiner that leaves the rest out too,
    # it holds the same state as the full checkpoints and adds to their support; it serves
    # the file they share.
    thin = StateOffered(run=RUN, step=9, names=("outer.safetensors",), sizes=(10,),
                        hashes=("outer.safetensors",))
    leave_out = frozenset({"trainable.safetensors", "optimizer.pt"})
    offers: OfferRound[str] = OfferRound(RUN, have_step=-1, leave_out=leave_out)
    offers.received("full", offered(9))
    offers.received("thin", thin)
    offers.received("older-a", offered(6))
    offers.received("older-b", offered(6))
    chosen = offers.choose(asked=4)
    assert chosen.step == 9 and set(chosen.offers) == {"full", "thin"}
    assert chosen.sources_of("outer.safetensors") == ["full", "thin"]
    # A joiner that downloads every file tells the two apart, and takes the older state
    # more peers hold whole.
    whole: OfferRound[str] = OfferRound(RUN, have_step=-1)
    for peer, offer in (("full", offered(9)), ("thin", thin), ("older-a", offered(6)),
                        ("older-b", offered(6))):
        whole.received(peer, offer)
    assert whole.choose(asked=4).step == 6
