"""The sync service in a real daemon: a worker that cannot train is reported, not fatal;
the worker methods refuse bad input; the shared buffer is shared."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dandelion_p2p.control.protocol import CommandFailed
from dandelion_p2p.sync.supervisor import WorkerProcess, describe_exit
from dandelion_p2p.worker import protocol
from dandelion_p2p.worker.shm import SharedVector, remove_stale
from dandelion_p2p.worker.tiny import write_images
from tests.daemon_proc import start_daemon
from tests.worker.runconfigs import tiny_run


def test_a_worker_that_cannot_train_is_reported_and_the_protocol_holds(tmp_path: Path) -> None:
    run_config = tmp_path / "run.toml"
    run_config.write_text(tiny_run(tmp_path / "no-such-model").to_toml())
    write_images(tmp_path / "d" / "training-data", 1)
    daemon = start_daemon("daemon", ["--no-webui", "--listen", "/ip4/127.0.0.1/tcp/0",
                                     "--run-config", str(run_config)], tmp_path / "d")
    try:
        deadline = time.monotonic() + 120
        while (status := daemon.call("training.status"))["state"] != "crashed":
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert "configuration problem" in status["detail"]
        assert "does not exist" in status["detail"]
        time.sleep(1.5)
        assert daemon.call("training.status")["crashes"] == 1, "a config error is not retried"
        assert daemon.call("status")["peer_id"] == daemon.peer_id, "the daemon lives on"
        shown = subprocess.run(
            [sys.executable, "-m", "dandelion_p2p.cli", "status",
             "--data-dir", str(daemon.data_dir)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        assert "training:       crashed" in shown and "does not exist" in shown, shown

        with pytest.raises(CommandFailed, match="worker protocol"):
            daemon.call("worker.hello", {"protocol": 99})
        hello = daemon.call("worker.hello", {"protocol": protocol.PROTOCOL_VERSION,
                                             "pid": os.getpid()})
        assert "no-such-model" in hello["run_config"] and hello["run"] == "tiny"
        with pytest.raises(CommandFailed, match="unknown worker session"):
            daemon.call("worker.buffer", {"session": "forged", "elements": 10})
        with pytest.raises(CommandFailed, match="elements"):
            daemon.call("worker.buffer", {"session": hello["session"], "elements": -5})
        with pytest.raises(CommandFailed, match="buffer"):
            daemon.call("worker.sync", {"session": hello["session"], "round": 1, "weight": 1})
        path = daemon.call("worker.buffer", {"session": hello["session"], "elements": 1000})
        shared = SharedVector(Path(path["path"]), 1000, create=False)
        shared.array[:] = np.arange(1000, dtype=np.float32)
        with pytest.raises(CommandFailed, match="round"):
            daemon.call("worker.sync", {"session": hello["session"], "round": "one",
                                        "weight": 1})
        answer = daemon.call("worker.progress", {"session": hello["session"], "state": "training",
                                                 "global_step": 7, "loss": 0.25,
                                                 "samples_per_second": float("nan")})
        assert answer == {"stop": False}
        status = daemon.call("training.status")
        assert (status["state"], status["global_step"], status["loss"]) == ("training", 7, 0.25)
        assert daemon.call("training.stop")["state"] == "stopped"
        assert daemon.call("worker.progress", {"session": hello["session"]}) == {"stop": True}
        with pytest.raises(CommandFailed, match="'run'"):
            daemon.call("run.join", {"run": ""})
        shared.close()
    finally:
        code, _ = daemon.stop(timeout=30)
    assert code == 0
    assert not Path(path["path"]).exists(), "the daemon removes the shared buffer"


def test_shared_vector_is_one_memory_for_two_mappings(tmp_path: Path) -> None:
    owner = SharedVector.create_in(tmp_path, 16)
    other = SharedVector(owner.path, 16, create=False)
    other.array[3] = 2.5
    assert owner.array[3] == 2.5
    assert (owner.path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(ValueError, match="expected"):
        SharedVector(owner.path, 17, create=False)
    other.close()
    owner.unlink()
    assert not owner.path.exists()


def test_buffers_of_dead_daemons_are_removed(tmp_path: Path) -> None:
    import subprocess

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = SharedVector(tmp_path / f"dandelion-worker-{gone.stdout.strip()}-ab.f32", 4,
                         create=True)
    stale.close()
    live = SharedVector.create_in(tmp_path, 4)
    other = tmp_path / "dandelion-worker-notes.txt"
    other.write_text("not ours to judge")
    assert remove_stale(tmp_path) == [stale.path]
    assert live.path.exists() and other.exists()
    live.unlink()


def test_exit_codes_are_explained() -> None:
    assert not describe_exit(2, ["ERROR cannot train: model folder /x does not exist"]).restart
    config_error = describe_exit(2, ["ERROR cannot train: model folder /x does not exist"])
    assert "does not exist" in config_error.detail
    oom = describe_exit(-signal.SIGKILL, [])
    assert oom.restart and "out-of-memory killer" in oom.detail
    assert describe_exit(3, ["ERROR out of memory: CUDA"]).restart
    assert "exit code 1" in describe_exit(1, []).detail


async def test_a_worker_process_is_stopped_with_sigterm() -> None:
    import trio

    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('bye', flush=True), sys.exit(0)))\n"
              "print('up', flush=True)\n"
              "time.sleep(60)\n")
    process = WorkerProcess([sys.executable, "-c", script])
    pids: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(process.run, pids.append)
        with trio.fail_after(20):
            while "up" not in process.tail:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert pids and process.process is not None
    assert process.process.returncode == 0, "it exited through its SIGTERM handler"
