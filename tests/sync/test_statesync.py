"""State transfer messages and the server's answers, without a network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dandelion_p2p.errors import ProtocolViolation
from dandelion_p2p.identity import Identity
from dandelion_p2p.sync.statesync import StateServer
from dandelion_p2p.sync.statesync_core import (
    CHUNK,
    StateChunk,
    StateOffer,
    StateOffered,
    StateRead,
)
from dandelion_p2p.wire import RejectCode
from dandelion_p2p.worker.checkpoint import CheckpointStore

PEER = Identity.generate().peer_id


def test_messages_are_bounded_and_checked() -> None:
    with pytest.raises(ProtocolViolation):
        StateRead(run="r", step=1, name="../../etc/passwd", offset=0, length=10)
    with pytest.raises(ProtocolViolation):
        StateRead(run="r", step=1, name="a.pt", offset=0, length=CHUNK + 1)
    with pytest.raises(ProtocolViolation):
        StateOffered(run="r", step=1, names=("a",), sizes=(), hashes=())
    with pytest.raises(ProtocolViolation):
        StateOffer(run="")


async def test_the_server_offers_its_newest_and_serves_only_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=3)
    for step in (3, 6):
        store.save(step, {}, {"trainable": {"w": torch.full((1000,), float(step))}},
                   {"optimizer": {}})
    (tmp_path / "checkpoints" / "secret.txt").write_text("not served")
    server = StateServer(host=None, run=lambda: "run", checkpoints=lambda: tmp_path / "checkpoints")  # type: ignore[arg-type]
    answer: Any = await server._answer(PEER, StateOffer(run="run"))
    assert isinstance(answer, StateOffered) and answer.step == 6
    files = answer.files()
    assert set(files) == {"trainable.safetensors", "optimizer.pt", "manifest.json"}
    size = files["trainable.safetensors"][0]
    chunk: Any = await server._answer(
        PEER, StateRead(run="run", step=6, name="trainable.safetensors", offset=0, length=size)
    )
    assert isinstance(chunk, StateChunk)
    assert chunk.data == (tmp_path / "checkpoints/step-00000006/trainable.safetensors").read_bytes()
    assert (await server._answer(PEER, StateOffer(run="other"))).step == -1  # type: ignore[attr-defined]
    older: Any = await server._answer(
        PEER, StateRead(run="run", step=3, name="trainable.safetensors", offset=0, length=16)
    )
    assert len(older.data) == 16, "a checkpoint still kept stays readable"
    for bad in (StateRead(run="run", step=4, name="trainable.safetensors", offset=0, length=1),
                StateRead(run="run", step=6, name="secret.txt", offset=0, length=1)):
        with pytest.raises(ProtocolViolation) as info:
            await server._answer(PEER, bad)
        assert info.value.code == RejectCode.NOT_FOUND
    with pytest.raises(ProtocolViolation):
        await server._answer(PEER, StateRead(run="run", step=6, name="optimizer.pt",
                                             offset=10**9, length=1))


async def test_a_checkpoint_replaced_under_its_step_is_offered_anew(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=3)
    store.save(6, {}, {"trainable": {"w": torch.zeros(100)}}, {"optimizer": {}})
    server = StateServer(host=None, run=lambda: "run", checkpoints=lambda: tmp_path / "checkpoints")  # type: ignore[arg-type]
    first: Any = await server._answer(PEER, StateOffer(run="run"))
    store.save(6, {}, {"trainable": {"w": torch.ones(100)}}, {"optimizer": {}})
    again: Any = await server._answer(PEER, StateOffer(run="run"))
    assert again.step == first.step == 6
    now = (tmp_path / "checkpoints/step-00000006/trainable.safetensors")
    from dandelion_p2p.hashing import file_digest

    assert again.files()["trainable.safetensors"][1] == file_digest(now)
    assert again.files()["trainable.safetensors"][1] != first.files()["trainable.safetensors"][1]


async def test_a_checkpoint_read_stays_readable_after_the_worker_prunes_it(
    tmp_path: Path,
) -> None:
    """A joiner's download outlasting ``keep_last`` rounds still finishes: the step it reads
    is pinned (hard links) and served after the worker deleted its folder; pins are bounded
    and released once idle."""
    from dandelion_p2p.sync import checkpoints as catalog_module

    root = tmp_path / "checkpoints"
    store = CheckpointStore(root, keep_last=1)
    store.save(3, {}, {"trainable": {"w": torch.full((1000,), 3.0)}}, {"optimizer": {}})
    expected = (root / "step-00000003/trainable.safetensors").read_bytes()
    now = [0.0]
    server = StateServer(host=None, run=lambda: "run", checkpoints=lambda: root)  # type: ignore[arg-type]
    server.catalog.clock = lambda: now[0]

    async def read(step: int, offset: int, length: int) -> bytes:
        got: Any = await server._answer(PEER, StateRead(run="run", step=step,
                                                        name="trainable.safetensors",
                                                        offset=offset, length=length))
        return bytes(got.data)

    first = await read(3, 0, 100)
    for step in (6, 9):  # the worker moves on and prunes step 3 (keep_last 1)
        store.save(step, {}, {"trainable": {"w": torch.full((1000,), float(step))}},
                   {"optimizer": {}})
    assert not (root / "step-00000003").exists()
    assert store.latest_step() == 9, "the worker's own store does not see the pin"
    rest = await read(3, 100, len(expected) - 100)
    assert first + rest == expected

    # At most MAX_PINS steps are pinned: reading two newer ones lets the oldest go.
    assert catalog_module.MAX_PINS == 2
    now[0] += 1.0
    await read(9, 0, 10)
    store.save(12, {}, {"trainable": {"w": torch.zeros(1000)}}, {"optimizer": {}})
    await read(12, 0, 10)
    assert not (root / ".pinned-step-00000003").exists()
    with pytest.raises(ProtocolViolation) as info:
        await read(3, 0, 10)
    assert info.value.code == RejectCode.NOT_FOUND

    # An idle pin goes at the next read after PIN_IDLE.
    assert (root / ".pinned-step-00000009").exists()
    now[0] += catalog_module.PIN_IDLE + 1
    await read(12, 0, 10)
    assert not (root / ".pinned-step-00000009").exists()
    assert not (root / "step-00000009").exists()
