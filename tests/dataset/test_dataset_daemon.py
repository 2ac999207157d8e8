"""The dataset role in a real daemon process: killed with SIGKILL mid-lease and restarted.

Clients are real swarm nodes in the test's trio loop; the daemon is a separate process with
its lease book in SQLite under its data dir.
"""

from __future__ import annotations

import itertools
import signal
import socket
import sqlite3
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID

from dandelion_p2p.control.client import call
from dandelion_p2p.control.protocol import CommandFailed
from dandelion_p2p.dataset.chunks import chunk_hash
from dandelion_p2p.dataset.messages import LeaseGrant
from dandelion_p2p.errors import PeerUnavailable, RemoteRejected
from dandelion_p2p.identity import Identity, write_identity
from dandelion_p2p.net.dht.messages import PeerRef
from dandelion_p2p.runconfig.publication import derive_run_id
from dandelion_p2p.runconfig.watcher import RunConfigWatcher
from tests.daemon_proc import DaemonProcess, start_daemon
from tests.dataset.helpers import dataset_client, packed_dataset, run_toml
from tests.swarm import public_settings, running_node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dataset_daemon(data_dir: Path, port: int, dataset: Path, toml: Path) -> DaemonProcess:
    return start_daemon(
        "daemon",
        ["--listen", f"/ip4/127.0.0.1/tcp/{port}", "--dataset", str(dataset),
         "--run-config", str(toml), "--no-worker", "--no-webui"],
        data_dir,
    )


def _overlapping_leases(db_path: Path, epoch: int) -> list[tuple[str, int, int]]:
    """Pairs of leases of one chunk whose active periods overlapped."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT chunk, id, granted_at, MIN(expires_at, COALESCE(ended_at, expires_at)) "
            "FROM leases WHERE epoch=? ORDER BY chunk, granted_at",
            (epoch,),
        ).fetchall()
    finally:
        db.close()
    overlaps = []
    for (c1, id1, _, end1), (c2, id2, start2, _) in itertools.pairwise(rows):
        if c1 == c2 and start2 < end1:
            overlaps.append((c1, id1, id2))
    return overlaps


def _db_rows(db_path: Path, query: str, *args: object) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return db.execute(query, args).fetchall()
    finally:
        db.close()


async def test_sigkill_mid_lease_loses_nothing_and_grants_nothing_twice(tmp_path: Path) -> None:
    owner = Identity.generate()
    data_dir = tmp_path / "daemon"
    data_dir.mkdir()
    write_identity(data_dir / "identity.key", owner)
    dataset, manifest = packed_dataset(tmp_path, owner, images=12)
    total = len(manifest.chunks)
    toml = tmp_path / "run.toml"
    toml.write_text(run_toml(lease_seconds=4.0))
    run = derive_run_id(owner.peer_id_bytes, "tiny")
    port = _free_port()
    daemon = _dataset_daemon(data_dir, port, dataset, toml)
    try:
        addr = f"/ip4/127.0.0.1/tcp/{port}"
        server = PeerRef(peer_id=owner.peer_id_bytes, addrs=(addr,))
        granted: list[int] = []
        async with AsyncExitStack() as stack:
            boot = (f"{addr}/p2p/{owner.peer_id.to_base58()}",)
            nodes = [await stack.enter_async_context(
                running_node(public_settings(bootstrap=boot))) for _ in range(2)]
            holder, worker = (
                dataset_client(n, run, tmp_path / f"cache-{i}", servers=[server],
                               announce_holdings=False)
                for i, n in enumerate(nodes)
            )
            # The holder takes a lease and keeps it across the crash.
            held = await holder.lease()
            granted.append(held.lease_id)

            epoch_done = trio.Event()
            done_by_worker: list[str] = []

            async def train() -> None:
                while True:
                    try:
                        reply = await worker.try_lease()
                    except (PeerUnavailable, RemoteRejected):
                        await trio.sleep(0.1)
                        continue
                    if not isinstance(reply, LeaseGrant):
                        if reply.epoch > 0:
                            break
                        await trio.sleep(0.1)
                        continue
                    if reply.epoch > 0:
                        break
                    granted.append(reply.lease_id)
                    while True:
                        try:
                            await worker.fetch(reply.chunk, expected_size=reply.size)
                            break
                        except PeerUnavailable:
                            await trio.sleep(0.1)
                    try:
                        await worker.complete(reply, attempts=200, retry_delay=0.1)
                        done_by_worker.append(reply.chunk)
                    except RemoteRejected:
                        pass  # expired while we were cut off; someone else completed it
                epoch_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(train)
                with trio.fail_after(20):
                    while len(done_by_worker) < 1:
                        await trio.sleep(0.02)
                daemon.proc.send_signal(signal.SIGKILL)
                daemon.proc.wait()
                # Started from a thread: the peers in this loop keep answering meanwhile.
                daemon = await trio.to_thread.run_sync(
                    _dataset_daemon, data_dir, port, dataset, toml)
                # The lease granted before the crash is still the holder's to complete.
                ack = await holder.complete(held, attempts=200, retry_delay=0.1)
                assert ack.total == total
                with trio.fail_after(40):
                    await epoch_done.wait()

            db_path = data_dir / "dataset" / f"{run}.sqlite"
            per_chunk = dict(_db_rows(db_path, "SELECT chunk, COUNT(*) FROM receipts "
                                               "WHERE epoch=0 GROUP BY chunk"))
            assert per_chunk == {c.hash: 1 for c in manifest.chunks}
            assert _overlapping_leases(db_path, 0) == []
            known = {row[0] for row in _db_rows(db_path, "SELECT id FROM leases")}
            assert set(granted) <= known, "a lease a peer was given is missing after restart"
            holder_receipt = _db_rows(db_path, "SELECT peer FROM receipts WHERE lease_id=?",
                                      held.lease_id)
            assert holder_receipt == [(nodes[0].identity.peer_id_bytes,)]

            # The control methods of the restarted daemon.
            sock = daemon.control_socket
            status = await call(sock, "dataset.status", {})
            assert status["run"] == run and status["chunks"] == total
            runs = (await call(sock, "runs.list", {}))["runs"]
            assert [(r["run"], r["version"], r["owner"]) for r in runs] == [
                (run, 1, owner.peer_id.to_base58())]
            got = await call(sock, "runconfig.get", {"run": run})
            assert got["version"] == 1 and got["config"]["optimizer"]["lr"] == pytest.approx(1e-4)

            # A new learning rate published mid-run reaches a peer's watcher.
            dht = nodes[1].dht
            assert dht is not None
            watcher = RunConfigWatcher(run, dht, poll_interval=0.2)
            published = await call(sock, "runconfig.publish", {"toml": run_toml(lr=2e-4)})
            assert (published["run"], published["version"]) == (run, 2)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watcher.run_forever)
                with trio.fail_after(15):
                    newest = await watcher.changed(1)
                nursery.cancel_scope.cancel()
            assert newest.config.optimizer.lr == pytest.approx(2e-4)
            assert ID.from_base58(newest.owner) == owner.peer_id

            listing = await trio.run_process(
                [sys.executable, "-m", "dandelion_p2p.cli", "runs", "--data-dir",
                 str(data_dir)],
                capture_stdout=True, capture_stderr=True,
            )
            line = listing.stdout.decode()
            assert run in line and "v2" in line and "tiny-sd" in line, listing.stderr

            # A training daemon in the run: leases, chunk files and receipts for its worker.
            trainer = await trio.to_thread.run_sync(lambda: start_daemon(
                "daemon",
                ["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", boot[0], "--run", run,
                 "--no-worker", "--no-webui"],
                tmp_path / "trainer",
            ))
            try:
                tsock = trainer.control_socket
                lease = await call(tsock, "dataset.lease", {}, timeout=20)
                assert lease["run"] == run and lease["epoch"] == 1
                fetched = await call(tsock, "dataset.fetch",
                                     {"chunk": lease["chunk"], "size": lease["size"]})
                assert chunk_hash(Path(fetched["path"]).read_bytes()) == lease["chunk"]
                done = await call(tsock, "dataset.complete", {"lease_id": lease["lease_id"]})
                assert (done["epoch"], done["completed"], done["total"]) == (1, 1, total)
                config = await call(tsock, "runconfig.get", {})
                assert config["version"] == 2
                with pytest.raises(CommandFailed, match="no open lease"):
                    await call(tsock, "dataset.complete", {"lease_id": lease["lease_id"]})
            finally:
                trainer.stop()
    finally:
        daemon.stop()


def test_a_daemon_refuses_to_serve_a_damaged_pack(tmp_path: Path) -> None:
    owner = Identity.generate()
    dataset, manifest = packed_dataset(tmp_path, owner, images=4)
    (dataset / f"{manifest.chunks[1].hash}.tar").unlink()
    toml = tmp_path / "run.toml"
    toml.write_text(run_toml())
    result = subprocess.run(
        [sys.executable, "-m", "dandelion_p2p.cli", "daemon", "--listen",
         "/ip4/127.0.0.1/tcp/0", "--no-webui", "--no-worker", "--dataset", str(dataset),
         "--run-config", str(toml), "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert f"chunk {manifest.chunks[1].hash} is missing" in result.stderr
