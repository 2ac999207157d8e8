"""State transfer against peers that lie: offers that claim a far newer step or other bytes,
names that are paths, sizes no checkpoint has, and more requests at once than a joiner makes.
The download test runs real libp2p hosts on loopback."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.hashing import file_digest
from dandelion_p2p.identity import Identity
from dandelion_p2p.sync.statesync import MAX_READS_PER_PEER, StateServer, fetch_state
from dandelion_p2p.sync.statesync_core import (
    CHUNK,
    MAX_FILE_SIZE,
    OfferRound,
    StateOffer,
    StateOffered,
    StateRead,
    StateUnavailable,
)
from dandelion_p2p.wire import RejectCode
from dandelion_p2p.worker.checkpoint import CheckpointStore
from tests.swarm import swarm

RUN = "tiny-00112233445566778899aabb"


def offered(step: int, trainable: str = "good") -> StateOffered:
    return StateOffered(run=RUN, step=step,
                        names=("trainable.safetensors", "outer.safetensors", "manifest.json"),
                        sizes=(3 * CHUNK, 10, 20), hashes=(trainable, "outer", "manifest"))


@pytest.mark.parametrize("names, sizes", [
    ((".",), (1,)), (("..",), (1,)), ((".hidden",), (1,)), (("a/b",), (1,)),
    (("a", "a"), (1, 1)), (("big",), (MAX_FILE_SIZE + 1,)),
    (tuple(f"f{i}" for i in range(65)), (1,) * 65),
])
def test_an_offer_with_a_path_a_repeated_name_or_an_absurd_size_is_refused(
        names: tuple[str, ...], sizes: tuple[int, ...]) -> None:
    with pytest.raises(ProtocolViolation) as info:
        StateOffered(run=RUN, step=1, names=names, sizes=sizes, hashes=("h",) * len(names))
    assert info.value.code == RejectCode.INVALID_FIELD


def test_one_peer_claiming_a_far_newer_step_is_outvoted_by_the_peers_that_agree() -> None:
    offers: OfferRound[str] = OfferRound(RUN, have_step=-1)
    offers.received("honest-1", offered(6))
    offers.received("liar", offered(10**12, trainable="poison"))
    offers.received("honest-2", offered(6))
    chosen = offers.choose(asked=3)
    print(f"offers: 2 honest at step 6, 1 liar at step 10^12; chosen step {chosen.step} "
          f"from {sorted(chosen.offers)}")
    assert (chosen.step, sorted(chosen.offers)) == (6, ["honest-1", "honest-2"])


def test_one_peer_offering_other_bytes_for_the_same_step_is_outvoted() -> None:
    offers: OfferRound[str] = OfferRound(RUN, have_step=-1)
    offers.received("liar", offered(6, trainable="poison"))
    offers.received("honest-1", offered(6))
    offers.received("honest-2", offered(6))
    chosen = offers.choose(asked=3)
    assert chosen.reference == "honest-1" and "liar" not in chosen.offers
    assert chosen.files()["trainable.safetensors"][1] == "good"


def test_one_against_one_at_the_same_step_is_undecided_not_a_coin_toss() -> None:
    offers: OfferRound[str] = OfferRound(RUN, have_step=-1)
    offers.received("a", offered(6, trainable="x"))
    offers.received("b", offered(6, trainable="y"))
    with pytest.raises(StateUnavailable, match="offered by equally many peers"):
        offers.choose(asked=2)


class _BlockingCheckpoints:
    """A catalog whose reads wait until the test lets them go, so requests pile up."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def newest(self) -> Any:
        return self.at_step(1)

    def at_step(self, step: int) -> Any:
        class Listing:
            files = {"a.bin": (CHUNK, "h")}
        listing = Listing()
        listing.step = step  # type: ignore[attr-defined]
        return listing

    def read(self, listing: Any, name: str, offset: int, length: int) -> bytes:
        self.release.wait(10)
        return b"x" * length


async def test_the_server_answers_a_bounded_number_of_requests_per_peer_at_once() -> None:
    server = StateServer(host=None, run=lambda: RUN, checkpoints=lambda: None)  # type: ignore[arg-type]
    blocking = _BlockingCheckpoints()
    server.catalog = blocking  # type: ignore[assignment]
    greedy, other = Identity.generate().peer_id, Identity.generate().peer_id
    read = StateRead(run=RUN, step=1, name="a.bin", offset=0, length=16)
    answered: list[int] = []

    async def one(peer: Any) -> None:
        reply: Any = await server._answer(peer, read)
        answered.append(len(reply.data))

    async with trio.open_nursery() as nursery:
        for _ in range(MAX_READS_PER_PEER):
            nursery.start_soon(one, greedy)
        await trio.sleep(0.2)
        with pytest.raises(ProtocolViolation) as info:
            await server._answer(greedy, read)
        assert info.value.code == RejectCode.RATE_LIMITED
        nursery.start_soon(one, other)  # another peer is still served
        await trio.sleep(0.2)
        blocking.release.set()
    assert answered == [16] * (MAX_READS_PER_PEER + 1)


async def test_a_checkpoint_outside_the_offer_rules_is_not_offered_and_not_blamed(
        tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "step-00000004"
    folder.mkdir(parents=True)
    (folder / ".hidden").write_bytes(b"x")
    (folder / "manifest.json").write_text('{"files": {".hidden": "h"}}')
    server = StateServer(host=None, run=lambda: RUN, checkpoints=lambda: tmp_path / "checkpoints")  # type: ignore[arg-type]
    reply: Any = await server._answer(Identity.generate().peer_id, StateOffer(run=RUN))
    assert isinstance(reply, StateOffered) and reply.step == -1


def _save(root: Path, step: int, value: float) -> None:
    CheckpointStore(root, keep_last=3).save(
        step, {}, {"trainable": {"w": torch.full((4096,), value)}}, {"optimizer": {}})


async def test_a_joiner_downloads_what_the_honest_peers_agree_on_not_the_liars_newer_state(
        tmp_path: Path) -> None:
    async with swarm(4) as nodes:
        honest_a, honest_b, liar, joiner = nodes
        for node, step, value in ((honest_a, 6, 1.0), (honest_b, 6, 1.0),
                                  (liar, 10**9, 666.0)):
            root = tmp_path / node.host.get_id().to_base58()
            _save(root, step, value)
            StateServer(node.host, run=lambda: RUN, checkpoints=lambda r=root: r).install()
        sources = [n.host.get_id() for n in (honest_a, liar, honest_b)]
        with trio.fail_after(60):
            step, used = await fetch_state(joiner.host, sources, RUN, -1, tmp_path / "joiner",
                                           timeout=10.0, connect=joiner.connect_peer)
        got = tmp_path / "joiner" / f"step-{step:08d}" / "trainable.safetensors"
        honest = (tmp_path / honest_a.host.get_id().to_base58() / "step-00000006"
                  / "trainable.safetensors")
        print(f"joiner took step {step} from {len(used)} peers; liar offered step 10^9")
        assert step == 6 and liar.host.get_id().to_base58() not in used
        assert file_digest(got) == file_digest(honest)
