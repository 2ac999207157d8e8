"""A joiner's download that leaves out the files it has no use for: only the others cross the
wire, over real libp2p hosts on loopback, and the folder verifies as a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import trio

from dandelion_p2p.sync.partial_state import MAX_MANIFEST, held_manifest, leave_out_names
from dandelion_p2p.sync.statesync import DownloadProgress, StateServer, fetch_state
from dandelion_p2p.sync.statesync_core import StateUnavailable
from dandelion_p2p.worker.checkpoint import CheckpointStore
from tests.swarm import swarm

RUN = "tiny-00112233445566778899aabb"
OWN = frozenset({"optimizer.pt", "rng.pt"})


@pytest.mark.parametrize("value", [
    "optimizer.pt", ["../outer.safetensors"], ["manifest.json"], [3], ["a"] * 65, [".hidden"],
    [["rng.pt"]],
])
def test_only_a_short_list_of_plain_file_names_other_than_the_manifest_is_left_out(
    value: object
) -> None:
    with pytest.raises(ValueError):
        leave_out_names(value)


def test_names_to_leave_out_are_taken_as_a_set() -> None:
    assert leave_out_names(None) == frozenset()
    assert leave_out_names(["rng.pt", "rng.pt", "optimizer.pt"]) == OWN


OFFERED = {"outer.safetensors": "aa", "optimizer.pt": "bb", "rng.pt": "cc"}


def test_the_manifest_lists_only_the_files_held_and_names_the_others() -> None:
    manifest = json.dumps({"format": 1, "step": 6, "files": OFFERED}).encode()
    rewritten = held_manifest(manifest, OFFERED, OWN | {"ema.safetensors"})
    assert rewritten is not None
    kept = json.loads(rewritten)
    assert kept["files"] == {"outer.safetensors": "aa"}
    assert kept["left_out"] == {"optimizer.pt": "bb", "rng.pt": "cc"}
    assert kept["step"] == 6
    assert held_manifest(manifest, OFFERED, ()) is None, "nothing left out: kept as it came"


@pytest.mark.parametrize("manifest", [
    b"\xff\xfe", b"[1, 2]", b'{"files": ["a"]}', b'{"step": 6}', b"[" * 200_000,
    b'{"files": {}, "pad": "' + b"x" * MAX_MANIFEST + b'"}',
    # Other files or hashes than the offer's: the worker would load something else.
    b'{"files": {}}',
    b'{"files": {"outer.safetensors": "aa", "optimizer.pt": "bb", "rng.pt": "zz"}}',
    b'{"files": {"outer.safetensors": "aa", "optimizer.pt": "bb"}}',
])
def test_what_is_no_manifest_of_the_offer_is_refused_with_a_reason(manifest: bytes) -> None:
    for left_out in (OWN, frozenset()):
        with pytest.raises(ValueError):
            held_manifest(manifest, OFFERED, left_out)


def _serve(server_root: Path) -> CheckpointStore:
    store = CheckpointStore(server_root, keep_last=3)
    outer = {"start": torch.arange(300_000, dtype=torch.float32),
             "momentum": torch.ones(300_000)}
    store.save(6, {"run": RUN}, {"trainable": {"w": outer["start"]}, "outer": outer},
               {"optimizer": {"moments": torch.zeros(600_000)}, "rng": {"seed": 1}})
    return store


async def test_a_download_leaves_out_the_files_named_and_verifies_as_a_checkpoint(
    tmp_path: Path
) -> None:
    _serve(tmp_path / "server")
    source = tmp_path / "server" / "step-00000006"
    left_out = OWN | {"trainable.safetensors"}
    async with swarm(2) as (server, joiner):
        StateServer(server.host, run=lambda: RUN,
                    checkpoints=lambda: tmp_path / "server").install()
        progress = DownloadProgress()
        with trio.fail_after(30):
            step, _ = await fetch_state(joiner.host, [server.host.get_id()], RUN, -1,
                                        tmp_path / "joiner", timeout=10.0,
                                        connect=joiner.connect_peer, progress=progress,
                                        leave_out=left_out)
    assert step == 6
    folder = tmp_path / "joiner" / "step-00000006"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "outer.safetensors"]
    held = (folder / "outer.safetensors").stat().st_size + (folder / "manifest.json").stat().st_size
    assert progress.total <= held + 4096, "only the files held crossed the wire"
    checkpoint = CheckpointStore(tmp_path / "joiner", keep_last=3).latest()
    assert checkpoint is not None and checkpoint.step == 6
    assert not checkpoint.has("optimizer.pt") and checkpoint.has("outer.safetensors")
    original = json.loads((source / "manifest.json").read_text())["files"]
    assert checkpoint.meta["left_out"] == {n: original[n] for n in left_out}
    assert checkpoint.tensors("outer")["momentum"].sum() == 300_000


async def test_a_state_whose_manifest_is_too_large_to_check_is_not_taken(
    tmp_path: Path
) -> None:
    _serve(tmp_path / "server")
    manifest = tmp_path / "server" / "step-00000006" / "manifest.json"
    padded = {**json.loads(manifest.read_text()), "pad": "x" * MAX_MANIFEST}
    manifest.write_text(json.dumps(padded))
    async with swarm(2) as (server, joiner):
        StateServer(server.host, run=lambda: RUN,
                    checkpoints=lambda: tmp_path / "server").install()
        with trio.fail_after(30), pytest.raises(StateUnavailable, match="manifest of at most"):
            await fetch_state(joiner.host, [server.host.get_id()], RUN, -1, tmp_path / "joiner",
                              timeout=10.0, connect=joiner.connect_peer, leave_out=OWN)
    assert not (tmp_path / "joiner" / "step-00000006").exists()


async def test_a_manifest_that_lists_other_files_than_the_offer_is_not_taken(
    tmp_path: Path
) -> None:
    # A hostile reference offers files its manifest does not list: the checked download
    # would otherwise be reported in while the worker loads something else, or nothing.
    _serve(tmp_path / "server")
    folder = tmp_path / "server" / "step-00000006"
    manifest = json.loads((folder / "manifest.json").read_text())
    listed = dict(manifest["files"])
    manifest["files"] = {"outer.safetensors": listed["outer.safetensors"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    async with swarm(2) as (host, joiner):
        state = StateServer(host.host, run=lambda: RUN, checkpoints=lambda: tmp_path / "server")
        # An honest server offers what its manifest lists; this one offers every file.
        served = state.catalog.newest()
        assert served is not None
        for name, digest in listed.items():
            served.files[name] = ((folder / name).stat().st_size, digest)
        state.install()
        with trio.fail_after(30), pytest.raises(StateUnavailable, match="other files"):
            await fetch_state(joiner.host, [host.host.get_id()], RUN, -1, tmp_path / "joiner",
                              timeout=10.0, connect=joiner.connect_peer)
    assert not (tmp_path / "joiner" / "step-00000006").exists()
    assert not (tmp_path / "joiner" / ".download-step-00000006" / "manifest.json").exists()
