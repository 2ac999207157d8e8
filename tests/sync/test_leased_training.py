"""Workers with no local images train on chunks leased from the run's dataset server.

A run owner's daemon serves the packed dataset and publishes the run; peers join it by run
id with no training folder. Their workers lease chunks through their daemons, hand in a
receipt per chunk, and average with each other; a killed worker is restarted and trains on.
A restarted worker goes on with the chunk whose lease its daemon still holds.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from libp2p.peer.id import ID
from safetensors.torch import load_file

from dandelion_p2p.dataset.manifest import signed_digest, signed_document
from dandelion_p2p.dataset.pack import pack
from dandelion_p2p.identity import Identity, write_identity
from dandelion_p2p.runconfig.publication import derive_run_id
from dandelion_p2p.worker.feeds import LeasedFeed, Position
from dandelion_p2p.worker.link import DaemonLink
from tests.daemon_proc import DaemonProcess, launch_daemon, start_daemon, start_daemons
from tests.dataset.helpers import image_folder
from tests.sync.test_swarm_training import read_jsonl, wait_for
from tests.worker.runconfigs import tiny_run


def receipts(db: Path) -> list[tuple[int, str, bytes, int]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT epoch, chunk, peer, samples FROM receipts").fetchall()
    finally:
        conn.close()


def owner_and_run(tmp_path: Path, tiny_sd1: Path, images_per_chunk: int,
                  lease_seconds: float = 120.0,
                  **sections: dict[str, Any]) -> tuple[Path, Path, str, dict[str, int]]:
    """The run owner's data dir, the run config, the run id and the chunks (hash: samples)."""
    owner = Identity.generate()
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    write_identity(server_dir / "identity.key", owner)
    src = image_folder(tmp_path / "src", 16)
    # Noise images of ~27 KiB plus tar headers: 36 KiB of chunk each.
    manifest, _ = pack(src, tmp_path / "packed", owner,
                       chunk_bytes=36 * 1024 * images_per_chunk)
    digest = signed_digest(signed_document(tmp_path / "packed"))
    config = tiny_run(tiny_sd1, dataset={"manifest": digest, "lease_seconds": lease_seconds},
                      **sections)
    toml = tmp_path / "run.toml"
    toml.write_text(config.to_toml())
    run = derive_run_id(owner.peer_id_bytes, config.name)
    return server_dir, toml, run, {c.hash: c.samples for c in manifest.chunks}


def start_server(server_dir: Path, toml: Path, tmp_path: Path) -> DaemonProcess:
    return start_daemon("daemon", [
        "--listen", "/ip4/127.0.0.1/tcp/0", "--reachability", "public", "--no-worker",
        "--dataset", str(tmp_path / "packed"), "--run-config", str(toml)], server_dir)


def start_trainers(server: DaemonProcess, run: str, tmp_path: Path) -> list[DaemonProcess]:
    """Two daemons that train ``run`` on chunks leased from ``server``, started together
    (they only need the server)."""
    return start_daemons([launch_daemon("daemon", [
        "--listen", "/ip4/127.0.0.1/tcp/0", "--reachability", "public", "--worker",
        "--run", run, "--bootstrap", server.addrs[0]], tmp_path / f"peer{i}") for i in range(2)])


def test_workers_train_on_leased_chunks_and_hand_in_receipts(
    tiny_sd1: Path, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    server_dir, toml, run, chunks = owner_and_run(
        tmp_path, tiny_sd1, 2, training={"max_steps": 12, "batch_size": 2},
        sync={"local_steps": 3}, checkpoint={"every_steps": 2, "keep_last": 2})
    assert len(chunks) == 8
    server = start_server(server_dir, toml, tmp_path)
    daemons.append(server)
    peers = start_trainers(server, run, tmp_path)
    daemons.extend(peers)
    b = peers[1]

    # Kill b's worker once it has a checkpoint; its daemon starts it again.
    states = wait_for([b], lambda s: s[0]["global_step"] >= 3 and s[0]["pid"], "step 3")
    os.kill(states[0]["pid"], signal.SIGKILL)
    wait_for([b], lambda s: s[0]["crashes"] >= 1, "the crash to be seen")

    final = wait_for(peers, lambda s: all(x["state"] == "stopped" for x in s), "the end")
    assert [s["global_step"] for s in final] == [12, 12]
    for peer in peers:
        log = peer.logs()
        assert "leased chunk" in log, log[-4000:]
        assert not (peer.data_dir / "training-data").exists()
    assert "resumed from checkpoint" in b.logs()

    # Receipts: signed by the peers that trained, for chunks of the manifest, at most one per
    # chunk and epoch, each counting the chunk's samples.
    got = receipts(server_dir / "dataset" / f"{run}.sqlite")
    assert got, server.logs()[-4000:]
    trainers = {ID.from_base58(p.peer_id).to_bytes() for p in peers}
    assert {peer for _, _, peer, _ in got} <= trainers
    assert {peer for _, _, peer, _ in got} == trainers, "both peers handed in receipts"
    assert len({(epoch, chunk) for epoch, chunk, _, _ in got}) == len(got)
    for _, chunk, _, samples in got:
        assert samples == chunks[chunk]

    # Training worked as with a local folder: the loss fell and the peers agree.
    works = [p.data_dir / "worker" / "tiny" for p in peers]
    weights = [load_file(w / "checkpoints/step-00000012/trainable.safetensors") for w in works]
    gap = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    rejoin = [line for line in b.logs().splitlines()
              if any(w in line for w in ("resumed", "join", "download", "round", "behind"))]
    assert gap <= 1e-6, "\n".join([f"weights differ by {gap}", *rejoin[-60:]])
    for work in works:
        losses = [e["loss"] for e in read_jsonl(work / "train_log.jsonl")]
        assert all(loss == loss for loss in losses)
        # Only the current chunk's file stays in the worker's folder.
        assert len(list((work / "chunks").glob("*.tar"))) <= 1


def test_a_restarted_worker_goes_on_with_the_chunk_its_daemon_still_holds(
    tiny_sd1: Path, tmp_path: Path, daemons: list[DaemonProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dandelion_p2p.worker.feeds")
    server_dir, toml, run, chunks = owner_and_run(tmp_path, tiny_sd1, 4)
    server = start_server(server_dir, toml, tmp_path)
    daemons.append(server)
    peer = start_daemon("daemon", [
        "--listen", "/ip4/127.0.0.1/tcp/0", "--reachability", "public", "--no-worker",
        "--run", run, "--bootstrap", server.addrs[0]], tmp_path / "peer")
    daemons.append(peer)
    link = DaemonLink(peer.data_dir / "control.sock")
    work = tmp_path / "work"

    def feed() -> LeasedFeed:
        return LeasedFeed(link, work, [(64, 64)], 1, 7, lambda: False)

    first, before = feed(), Position()
    taken = first.next_batch(before)
    first.batch_trained(before)
    assert before.chunk in chunks and before.batch_in_chunk == 1
    second_batch = first.next_batch(replace(before))  # what the same worker would train next

    # "Restarted" from a checkpoint taken after the first batch: same lease, next batch.
    again, after = feed(), replace(before)
    assert again.next_batch(after).samples == second_batch.samples != taken.samples
    assert f"going on with chunk {before.chunk[:12]} at batch 1 of 4" in caplog.text
    assert (after.chunk, after.lease_id, after.batch_in_chunk) == (
        before.chunk, before.lease_id, 2)
    while after.chunks_done == 0:
        again.batch_trained(after)
        if after.chunks_done == 0:
            again.next_batch(after)
    got = receipts(server_dir / "dataset" / f"{run}.sqlite")
    assert [(chunk, samples) for _, chunk, _, samples in got] == [
        (before.chunk, chunks[before.chunk])]
    assert again.progress["completed"] == 1 and again.progress["total"] == len(chunks)

    # A checkpoint naming a lease the daemon no longer holds: a new lease, from the start.
    caplog.clear()
    late, stale = feed(), replace(before)
    late.next_batch(stale)
    assert "going on" not in caplog.text and "leased chunk" in caplog.text
    assert stale.lease_id != before.lease_id and stale.chunk != before.chunk
    assert stale.batch_in_chunk == 1

    # A worker that died before its first checkpoint: the next one takes over its lease
    # rather than leaving it to expire while the epoch waits for that chunk.
    fresh = Position()
    feed().next_batch(fresh)
    assert (fresh.lease_id, fresh.chunk, fresh.batch_in_chunk) == (
        stale.lease_id, stale.chunk, 1)
    link.close()


def test_a_peer_waiting_in_a_round_holding_an_epochs_last_chunk_stalls_no_one(
    tiny_sd1: Path, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Gradient mode: every step is a round both peers must reach. Three chunks (3, 3 and 2
    batches) for two peers: one of them leases the epoch's last chunk while the other finishes
    its own and needs more. Leases last 10 minutes, so a peer that waited for that chunk
    (which its holder trains only after the round it waits in) would stall both for as long."""
    server_dir, toml, run, chunks = owner_and_run(
        tmp_path, tiny_sd1, 6, lease_seconds=600.0,
        training={"max_steps": 10, "batch_size": 2},
        sync={"mode": "gradient", "target_batch": 4}, checkpoint={"every_steps": 5})
    assert sorted(chunks.values()) == [4, 6, 6]
    server = start_server(server_dir, toml, tmp_path)
    daemons.append(server)
    peers = start_trainers(server, run, tmp_path)
    daemons.extend(peers)
    started = time.monotonic()
    final = wait_for(peers, lambda s: all(x["state"] == "stopped" for x in s), "the end")
    took = time.monotonic() - started
    assert [s["global_step"] for s in final] == [10, 10]
    got = receipts(server_dir / "dataset" / f"{run}.sqlite")
    epochs = sorted({epoch for epoch, _, _, _ in got})
    print(f"\n10 gradient steps of two peers on 3 leased chunks (leases of 600 s): {took:.0f} s, "
          f"receipts of epochs {epochs}")
    assert took < 300, took
    assert len(epochs) >= 2, got
    for peer in peers:
        rounds = read_jsonl(peer.data_dir / "worker" / "tiny" / "sync_log.jsonl")
        assert rounds and all(r["members"] == 2 for r in rounds), rounds
