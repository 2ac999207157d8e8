"""SIGTERM to a swarm daemon stops its worker gracefully: the worker ends its step (a round
it waits in is cut short), writes its stop checkpoint and exits before the daemon closes its
control socket, its last output reaches the daemon's log, and a restarted daemon's worker
goes on from that step instead of retraining steps."""

from __future__ import annotations

import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from dandelion_p2p.runconfig.schema import RunConfig
from tests.daemon_proc import DaemonProcess, start_daemon
from tests.worker.runconfigs import tiny_run

TIMEOUT = 180.0


def start(tmp_path: Path, images: Path) -> DaemonProcess:
    data_dir = tmp_path / "peer"
    if not (data_dir / "training-data").exists():
        shutil.copytree(images, data_dir / "training-data")
    # A lone daemon has no peer to catch up from: its starting worker need not wait for one.
    args = ["--no-webui", "--listen", "/ip4/127.0.0.1/tcp/0", "--reachability", "public",
            "--run-config", str(tmp_path / "run.toml"), "--worker", "--catch-up-wait", "0"]
    return start_daemon("daemon", args, data_dir)


def wait_log(daemon: DaemonProcess, pattern: str) -> re.Match[str]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = re.search(pattern, daemon.logs())
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in the log:\n{daemon.logs()[-6000:]}")


def start_waiting_in_a_round(tmp_path: Path, images: Path, config: RunConfig,
                             daemons: list[DaemonProcess]) -> tuple[DaemonProcess, int]:
    """A lone daemon training ``config``, once its worker waits in a round (no group forms:
    it is alone); returns it and the global step it waits at."""
    (tmp_path / "run.toml").write_text(config.to_toml())
    daemon = start(tmp_path, images)
    daemons.append(daemon)
    deadline = time.monotonic() + TIMEOUT
    while (status := daemon.call("training.status"))["state"] != "syncing":
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    return daemon, status["global_step"]


# Both modes write their stop checkpoint by the same path; the gradient one runs with the
# slow suite.
@pytest.mark.parametrize("mode", [
    "local_steps", pytest.param("gradient", marks=pytest.mark.slow)])
def test_sigterm_lets_the_worker_write_its_stop_checkpoint(
    mode: str, tiny_sd1: Path, images: Path, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    # No periodic checkpoint before the stop; rounds find no group (one peer), so the worker
    # may be waiting in one when the signal comes.
    config = tiny_run(tiny_sd1, training={"max_steps": 100_000, "batch_size": 2},
                      sync={"mode": mode, "local_steps": 2, "target_batch": 2},
                      checkpoint={"every_steps": 100_000, "keep_last": 2})
    # Stopped while it waits in its first round.
    daemon, waiting_at = start_waiting_in_a_round(tmp_path, images, config, daemons)

    code, seconds = daemon.stop(signal.SIGTERM, timeout=90)
    assert code == 0
    logs = daemon.logs()
    stopped = re.search(r"worker\.process: .*the worker stopped at global step (\d+)", logs)
    assert stopped, f"the worker's last line is not in the daemon's log:\n{logs[-6000:]}"
    step = int(stopped.group(1))
    if mode == "gradient":
        # The step whose gradients were waiting to be averaged is dropped, not applied alone:
        # a gradient-mode peer never averages weights, so its weights would stay apart.
        assert step == waiting_at
    else:
        assert step >= 2
    checkpoints = daemon.data_dir / "worker" / "tiny" / "checkpoints"
    assert (checkpoints / f"step-{step:08d}").is_dir(), sorted(checkpoints.iterdir())
    assert "exit code" not in logs and "killed by" not in logs, logs[-6000:]
    assert seconds < 30, "a waiting round is cut short, not waited out"

    again = start(tmp_path, images)
    daemons.append(again)
    resumed = wait_log(again, r"resumed from checkpoint .* at global step (\d+)")
    assert int(resumed.group(1)) == step


def test_training_stop_cuts_short_the_round_the_worker_waits_in(
    tiny_sd1: Path, images: Path, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    # Alone, with a two-minute gathering window: the worker's round would wait for a group
    # far past the 30 s of grace the daemon gives a stopped worker before it kills it.
    config = tiny_run(tiny_sd1, training={"max_steps": 100_000, "batch_size": 2},
                      sync={"local_steps": 2, "overlap": False},
                      averaging={"gather_window": 120.0},
                      checkpoint={"every_steps": 100_000, "keep_last": 2})
    daemon, _ = start_waiting_in_a_round(tmp_path, images, config, daemons)

    asked = time.monotonic()
    deadline = asked + TIMEOUT
    daemon.call("training.stop")
    while (status := daemon.call("training.status"))["state"] != "stopped":
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    seconds = time.monotonic() - asked
    logs = daemon.logs()
    assert "ignored SIGTERM" not in logs, logs[-6000:]
    assert seconds < 30, "a waiting round is cut short, not waited out"
    stopped = re.search(r"worker\.process: .*the worker stopped at global step (\d+)", logs)
    assert stopped, logs[-6000:]
    step = int(stopped.group(1))
    checkpoints = daemon.data_dir / "worker" / "tiny" / "checkpoints"
    assert (checkpoints / f"step-{step:08d}").is_dir(), sorted(checkpoints.iterdir())

    # Started again, it trains on from its stop checkpoint.
    daemon.call("training.start")
    wait_log(daemon, rf"resumed from checkpoint .* at global step {step}\b")
