"""The averaged rounds peers keep for joiners (``RoundsOffer``, ``RoundRead``): the messages'
bounds, the server's answers from the worker's round files, the joiner's choice of the chain
of rounds (and of liars in it), and a download of that chain over real libp2p hosts on
loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from dandelion_p2p.averaging.compression import get_codec
from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.hashing import file_digest
from dandelion_p2p.identity import Identity
from dandelion_p2p.sync.statesync import StateServer, fetch_rounds
from dandelion_p2p.sync.statesync_core import (
    CHUNK,
    MAX_ROUNDS,
    STATE,
    RoundOffers,
    RoundRead,
    RoundsOffer,
    RoundsOffered,
    StateChunk,
)
from dandelion_p2p.wire import RejectCode, decode, encode
from dandelion_p2p.worker.served_rounds import (
    RoundArchive,
    decode_round,
    encode_round,
    rounds_to_keep,
)
from tests.swarm import swarm
from tests.worker.runconfigs import tiny_run

RUN = "tiny-00112233445566778899aabb"
PEER = Identity.generate().peer_id


def rounds(*listed: tuple[int, int, int, str]) -> RoundsOffered:
    return RoundsOffered(run=RUN, rounds=tuple(r[0] for r in listed),
                         members=tuple(r[1] for r in listed), sizes=tuple(r[2] for r in listed),
                         hashes=tuple(r[3] for r in listed))


@pytest.mark.parametrize("fields", [
    {"rounds": (3, 2), "members": (2, 2), "sizes": (1, 1), "hashes": ("a", "b")},
    {"rounds": (2, 2), "members": (2, 2), "sizes": (1, 1), "hashes": ("a", "b")},
    {"rounds": (2,), "members": (1,), "sizes": (1,), "hashes": ("a",)},
    {"rounds": (2,), "members": (2,), "sizes": (0,), "hashes": ("a",)},
    {"rounds": (2,), "members": (2,), "sizes": (1,), "hashes": ()},
    {"rounds": (-1,), "members": (2,), "sizes": (1,), "hashes": ("a",)},
    {"rounds": tuple(range(MAX_ROUNDS + 1)), "members": (2,) * (MAX_ROUNDS + 1),
     "sizes": (1,) * (MAX_ROUNDS + 1), "hashes": ("a",) * (MAX_ROUNDS + 1)},
])
def test_an_offer_of_rounds_out_of_order_unpaired_or_unbounded_is_refused(
        fields: dict[str, Any]) -> None:
    with pytest.raises(ProtocolViolation) as info:
        RoundsOffered(run=RUN, **fields)
    assert info.value.code == RejectCode.INVALID_FIELD


def test_round_messages_cross_the_wire_unchanged() -> None:
    for msg in (RoundsOffer(run=RUN, after=-1), rounds((4, 3, 100, "h")),
                RoundRead(run=RUN, round=4, offset=CHUNK, length=5)):
        assert decode(encode(msg), STATE) == msg
    with pytest.raises(ProtocolViolation):
        RoundRead(run=RUN, round=4, offset=0, length=CHUNK + 1)
    with pytest.raises(ProtocolViolation):
        RoundsOffer(run="", after=0)


def test_the_chain_follows_on_without_a_gap_and_each_round_is_what_most_peers_keep() -> None:
    offers: RoundOffers[str] = RoundOffers(RUN, after=3)
    offers.received("a", rounds((4, 3, 10, "r4"), (5, 3, 10, "r5"), (7, 3, 10, "r7")))
    offers.received("b", rounds((4, 3, 10, "r4"), (5, 3, 10, "r5"), (7, 3, 10, "r7")))
    offers.received("liar", rounds((4, 3, 10, "poison"), (5, 3, 10, "r5")))
    offers.received("keeps-none", RoundsOffered(run=RUN))
    offers.received("other-run", RoundsOffered(run="x", rounds=(4,), members=(2,), sizes=(1,),
                                               hashes=("h",)))
    chain = offers.chain()
    assert [(c.round, c.digest, sorted(c.sources)) for c in chain] == [
        (4, "r4", ["a", "b"]), (5, "r5", ["a", "b", "liar"])]
    assert offers.newest == 7, "round 7 lies beyond round 6, which nobody keeps"


def test_rounds_one_peer_claims_alone_are_neither_fetched_nor_a_gap() -> None:
    # Rounds the others have not run yet.
    offers: RoundOffers[str] = RoundOffers(RUN, after=3)
    offers.received("a", rounds((4, 3, 10, "r4")))
    offers.received("b", rounds((4, 3, 10, "r4")))
    offers.received("liar", rounds((4, 3, 10, "r4"), (5, 3, 10, "poison"), (9, 3, 10, "x")))
    assert [c.round for c in offers.chain()] == [4]
    assert offers.newest == 4
    # Rounds the others pruned already: the liar cannot bridge a joiner's old state.
    offers = RoundOffers(RUN, after=3)
    offers.received("a", rounds((8, 3, 10, "r8")))
    offers.received("b", rounds((8, 3, 10, "r8")))
    offers.received("liar", rounds(*((r, 3, 10, f"poison{r}") for r in range(4, 8)),
                                   (8, 3, 10, "r8")))
    assert offers.chain() == [] and offers.newest == 8
    # Two peers, one of which has finished the newest round already: half keep it.
    offers = RoundOffers(RUN, after=3)
    offers.received("a", rounds((4, 3, 10, "r4"), (5, 3, 10, "r5")))
    offers.received("b", rounds((4, 3, 10, "r4")))
    assert [c.round for c in offers.chain()] == [4, 5]


def test_a_round_offered_larger_than_the_run_can_have_is_ignored() -> None:
    offers: RoundOffers[str] = RoundOffers(RUN, after=0, max_size=1000)
    offers.received("liar-1", rounds((1, 2, 1 << 40, "huge")))
    offers.received("liar-2", rounds((1, 2, 1 << 40, "huge")))
    offers.received("honest", rounds((1, 2, 1000, "r1")))
    assert [(c.round, c.digest) for c in offers.chain()] == [(1, "r1")]


def test_a_round_two_versions_of_which_are_equally_kept_ends_the_chain() -> None:
    offers: RoundOffers[str] = RoundOffers(RUN, after=0)
    offers.received("a", rounds((1, 2, 10, "x"), (2, 2, 10, "y")))
    offers.received("b", rounds((1, 2, 10, "z"), (2, 2, 10, "y")))
    assert offers.chain() == []
    assert offers.newest == 2


def test_the_server_offers_the_rounds_the_worker_kept_and_serves_only_them(
        tmp_path: Path) -> None:
    archive = RoundArchive(tmp_path / "checkpoints", keep=3)
    vectors = {r: np.full(1000, r, dtype=np.float32) for r in range(1, 6)}
    for r, v in vectors.items():
        archive.add(r, 3, v, "fp16")
    archive.add(6, 1, vectors[1], "fp16")  # a round alone is not a swarm's round: not kept
    archive.wait()
    server = StateServer(host=None, run=lambda: RUN, checkpoints=lambda: tmp_path / "checkpoints")  # type: ignore[arg-type]
    offer: Any = server._answer_now(RoundsOffer(run=RUN, after=3), RUN)
    assert offer.rounds == (4, 5) and offer.members == (3, 3)
    assert server._answer_now(RoundsOffer(run=RUN, after=-1), RUN).rounds == (3, 4, 5)  # type: ignore[attr-defined]
    assert server._answer_now(RoundsOffer(run="other", after=-1), RUN).rounds == ()  # type: ignore[attr-defined]
    path = tmp_path / "checkpoints" / "rounds" / "round-00000005-3.bin"
    assert offer.hashes[1] == file_digest(path)
    chunk: Any = server._answer_now(RoundRead(run=RUN, round=5, offset=0, length=CHUNK), RUN)
    assert isinstance(chunk, StateChunk) and chunk.data == path.read_bytes()
    for bad, code in ((RoundRead(run=RUN, round=2, offset=0, length=1), RejectCode.NOT_FOUND),
                      (RoundRead(run=RUN, round=5, offset=10**9, length=1),
                       RejectCode.INVALID_FIELD)):
        with pytest.raises(ProtocolViolation) as info:
            server._answer_now(bad, RUN)
        assert info.value.code == code
    # A round written again (the peer loaded another state since) replaces the later ones.
    archive.add(4, 2, vectors[2], "fp16")
    archive.wait()
    assert server._answer_now(RoundsOffer(run=RUN, after=0), RUN).rounds == (3, 4)  # type: ignore[attr-defined]


async def test_a_joiner_downloads_the_rounds_the_honest_peers_keep_not_the_liars(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Three chunks and a bit each, so that the reads are spread over the sources.
    honest = {r: rng.standard_normal(3 * CHUNK // 4 + 7).astype(np.float32) for r in (5, 6, 7)}
    n = honest[5].size
    async with swarm(4) as nodes:
        honest_a, honest_b, liar, joiner = nodes
        for node in (honest_a, honest_b, liar):
            root = tmp_path / node.host.get_id().to_base58()
            archive = RoundArchive(root, keep=8)
            for r, v in honest.items():
                archive.add(r, 3, -v * 1000 if node is liar and r == 6 else v, "none")
            if node is liar:
                archive.add(8, 3, v, "none")  # a round only the liar claims to have
            archive.wait()
            StateServer(node.host, run=lambda: RUN, checkpoints=lambda r=root: r).install()
        sources = [n.host.get_id() for n in (honest_a, liar, honest_b)]
        target = tmp_path / "joiner"
        with trio.fail_after(60):
            got, newest = await fetch_rounds(joiner.host, sources, RUN, 4, target,
                                             timeout=10.0, connect=joiner.connect_peer)
        print(f"joiner fetched rounds {got}; the newest a peer keeps: {newest}")
        assert (got, newest) == ([5, 6, 7], 7), "round 8 is the liar's claim alone"
        for r, v in honest.items():
            data = (target / f"round-{r:08d}-3.bin").read_bytes()
            assert np.array_equal(decode_round(data, n), v), r
        # A second call resumes: nothing is downloaded again.
        with trio.fail_after(60):
            again, _ = await fetch_rounds(joiner.host, sources, RUN, 6, target, timeout=10.0,
                                          connect=joiner.connect_peer)
        assert again == [7]


@pytest.mark.parametrize("codec", ["none", "fp16", "bf16", "int8", "int4", "int2"])
def test_a_round_the_codec_decoded_is_kept_in_the_codecs_bytes_bit_for_bit(codec: str) -> None:
    rng = np.random.default_rng(1)
    c = get_codec(codec)
    n = 100_003  # a short last block and piece
    averaged = c.decode(c.encode(rng.standard_normal(n).astype(np.float32) * 1e-3), n)
    data = encode_round(averaged, codec)
    back = decode_round(data, n)
    assert back.view(np.uint32).tolist() == averaged.view(np.uint32).tolist()
    print(f"{codec}: {len(data)} bytes for {n} values")
    assert len(data) < c.encoded_size(n) + 64, "no piece had to be kept as float32"


def test_values_no_decoding_gave_are_kept_exactly_as_float32_pieces() -> None:
    rng = np.random.default_rng(2)
    n = 10 * 256 + 5
    c = get_codec("int8")
    vector = c.decode(c.encode(rng.standard_normal(n).astype(np.float32)), n)
    vector[300] = np.float32(0.123456789)  # piece 1 no longer a decoding
    vector[-1] = np.float32(1e-9)  # nor the short last piece
    data = encode_round(vector, "int8")
    assert np.array_equal(decode_round(data, n), vector)
    assert len(data) >= c.encoded_size(n) + 4 * (256 + 5)
    # An unknown codec falls back to float32.
    assert np.array_equal(decode_round(encode_round(vector, "int3"), n), vector)


@pytest.mark.parametrize("damage", ["short", "magic", "codec", "count", "length", "order"])
def test_a_damaged_kept_round_is_refused_with_a_reason(damage: str) -> None:
    n = 1000
    vector = np.linspace(-1, 1, n, dtype=np.float32)
    vector[0] = np.float32(0.1234567)
    data = bytearray(encode_round(vector, "int8"))
    if damage == "short":
        data = data[:10]
    elif damage == "magic":
        data[:4] = b"XXXX"
    elif damage == "codec":
        data[4:12] = b"int9\0\0\0\0"
    elif damage == "count":
        return_n = n + 1
        with pytest.raises(ValueError, match="values"):
            decode_round(bytes(data), return_n)
        return
    elif damage == "length":
        data += b"\0"
    elif damage == "order":
        data[20:24] = (99).to_bytes(4, "little")
    with pytest.raises(ValueError):
        decode_round(bytes(data), n)


def test_the_archive_knows_which_round_the_global_weights_came_from(tmp_path: Path) -> None:
    """``last_added``: the round whose result the global weights are, while no round applied
    alone (or the loading of a state) has changed them since: what lets a peer left behind
    replay the rounds it missed onto its own weights."""
    archive = RoundArchive(tmp_path, keep=2)
    vector = np.ones(300, dtype=np.float32)
    assert archive.last_added is None
    archive.add(4, 3, vector, "none")
    archive.add(5, 3, vector, "none")
    assert archive.last_added == 5
    archive.add(6, 1, vector, "none")  # an outer step taken alone
    assert archive.last_added is None
    archive.add(7, 2, vector, "none")
    archive.applied_alone()
    assert archive.last_added is None
    archive.add(8, 2, vector, "none")
    archive.clear()
    assert archive.last_added is None
    nothing_kept = RoundArchive(tmp_path / "none", keep=0)
    nothing_kept.add(3, 2, vector, "none")
    assert nothing_kept.last_added == 3 and not (tmp_path / "none").exists()


@pytest.mark.parametrize(("codec", "kept"), [("none", 8), ("fp16", 8), ("int8", 9),
                                              ("int4", 16), ("int2", 30)])
def test_peers_keep_the_rounds_a_joiner_that_can_follow_the_swarm_needs(
    codec: str, kept: int, tmp_path: Path
) -> None:
    # Its state (weights and momentum, 8 bytes a value) is that many rounds in the codec: a
    # link that fetches a round a sync interval downloads it in as many intervals.
    config = tiny_run(tmp_path, averaging={"codec": codec})
    assert config.checkpoint.keep_rounds is None
    assert rounds_to_keep(config) == kept
    for chosen in (0, 4, 64):
        assert rounds_to_keep(tiny_run(tmp_path, averaging={"codec": codec},
                                       checkpoint={"keep_rounds": chosen})) == chosen


def test_an_ema_or_streaming_fragments_ask_for_more_kept_rounds(tmp_path: Path) -> None:
    # An EMA is 4 bytes a value more to download; a fragment's round carries half the vector
    # with 2 fragments, and comes twice as often.
    assert rounds_to_keep(tiny_run(tmp_path, averaging={"codec": "int8"},
                                   training={"ema": True})) == 13
    assert rounds_to_keep(tiny_run(tmp_path, averaging={"codec": "int8"},
                                   sync={"local_steps": 4, "fragments": 2})) == 17
    assert rounds_to_keep(tiny_run(tmp_path, averaging={"codec": "int2"},
                                   sync={"local_steps": 4, "fragments": 4})) == 64
