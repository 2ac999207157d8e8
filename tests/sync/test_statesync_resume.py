"""An interrupted state download resumes at the chunk where it stopped, over real libp2p hosts
on loopback, and ends with the exact file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import trio

from dandelion_p2p.hashing import file_digest
from dandelion_p2p.sync.checkpoints import CheckpointCatalog, Served
from dandelion_p2p.sync.statesync import DownloadProgress, StateServer, fetch_state
from dandelion_p2p.sync.statesync_core import CHUNK
from dandelion_p2p.worker.checkpoint import CheckpointStore
from tests.swarm import swarm

RUN = "tiny-00112233445566778899aabb"


class CountingCatalog(CheckpointCatalog):
    """The server's own catalog, counting the chunks of each file it serves."""

    def __init__(self, root: Path) -> None:
        super().__init__(lambda: root)
        self.reads: dict[str, int] = {}

    def read(self, listing: Served, name: str, offset: int, length: int) -> bytes:
        self.reads[name] = self.reads.get(name, 0) + 1
        return super().read(listing, name, offset, length)


async def test_an_interrupted_download_resumes_where_it_stopped(tmp_path: Path) -> None:
    root = tmp_path / "server"
    store = CheckpointStore(root, keep_last=3)
    weights = torch.arange(12 * CHUNK // 4, dtype=torch.float32)  # 12 chunks of float32
    store.save(6, {}, {"trainable": {"w": weights}}, {"optimizer": {}})
    expected = root / "step-00000006" / "trainable.safetensors"
    chunks = -(-expected.stat().st_size // CHUNK)
    async with swarm(2) as (server, joiner):
        catalog = CountingCatalog(root)
        state = StateServer(server.host, run=lambda: RUN, checkpoints=lambda: root)
        state.catalog = catalog
        state.install()
        progress = DownloadProgress()
        folder = tmp_path / "joiner"

        async def interrupt_after_half(cancel: trio.CancelScope) -> None:
            while progress.done < 6 * CHUNK:
                await trio.sleep(0.005)
            cancel.cancel()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(interrupt_after_half, nursery.cancel_scope)
                await fetch_state(joiner.host, [server.host.get_id()], RUN, -1, folder,
                                  timeout=10.0, connect=joiner.connect_peer,
                                  progress=progress)
            first = catalog.reads.get("trainable.safetensors", 0)
            assert not (folder / "step-00000006").exists(), "the first try was cut short"
            step, _ = await fetch_state(joiner.host, [server.host.get_id()], RUN, -1, folder,
                                        timeout=10.0, connect=joiner.connect_peer)
        second = catalog.reads["trainable.safetensors"] - first
        print(f"{chunks} chunks: {first} read before the interruption, {second} after")
        assert step == 6
        got: Any = folder / "step-00000006" / "trainable.safetensors"
        assert file_digest(got) == file_digest(expected)
        assert second < chunks, "the second try read only what was missing"
        assert first + second <= chunks + 4, "at most the reads in flight were lost"
