"""Checkpoints are atomic, verified and pruned; kill -9 mid-save loses nothing saved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from dandelion_p2p.worker.checkpoint import CheckpointStore


def save(store: CheckpointStore, step: int) -> None:
    store.save(step, {"note": f"step {step}"}, {"weights": {"w": torch.full((4,), step * 1.0)}},
               {"optimizer": {"step": step}})


def test_the_last_n_are_kept_and_a_damaged_one_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    user_file = tmp_path / "ckpt" / "my-notes.txt"
    user_file.write_text("mine")
    store = CheckpointStore(tmp_path / "ckpt", keep_last=2)
    for step in (1, 2, 3):
        save(store, step)
    assert [p.name for p in store.steps()] == ["step-00000002", "step-00000003"]
    latest = store.latest()
    assert latest is not None and latest.step == 3 and latest.meta["note"] == "step 3"
    assert latest.tensors("weights")["w"][0] == 3.0 and latest.blob("optimizer") == {"step": 3}

    with (tmp_path / "ckpt/step-00000003/weights.safetensors").open("r+b") as f:
        f.seek(-2, os.SEEK_END)
        f.write(b"\x00\x01")
    fallback = CheckpointStore(tmp_path / "ckpt", keep_last=2).latest()
    assert fallback is not None and fallback.step == 2
    assert user_file.read_text() == "mine", "nothing but our own checkpoints is deleted"


SAVER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from dandelion_p2p.worker.checkpoint import CheckpointStore
    store = CheckpointStore(Path(sys.argv[1]), keep_last=3)
    big = {"w": torch.ones(8_000_000)}
    step = 0
    while True:
        step += 1
        store.save(step, {}, {"weights": big}, {"optimizer": {"step": step}})
        print(step, flush=True)
""")


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(root)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "1"
        deadline = time.monotonic() + 60
        while not list(root.glob(".tmp-step-*")) and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    store = CheckpointStore(root, keep_last=3)
    assert not list(root.glob(".tmp-step-*")), "the unfinished save is cleared at start"
    latest = store.latest()
    assert latest is not None and latest.step >= 1
    assert latest.tensors("weights")["w"].sum() == 8_000_000


def test_a_damaged_checkpoint_of_the_same_step_is_replaced(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt", keep_last=3)
    save(store, 1)
    save(store, 2)
    (tmp_path / "ckpt/step-00000002/weights.safetensors").write_bytes(b"torn")
    store.save(2, {"note": "again"}, {"weights": {"w": torch.full((4,), 7.0)}},
               {"optimizer": {"step": 2}})
    latest = store.latest()
    assert latest is not None and latest.step == 2 and latest.meta["note"] == "again"
    assert latest.tensors("weights")["w"][0] == 7.0


def test_a_sound_checkpoint_of_the_same_step_gives_way_to_the_current_state(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path / "ckpt", keep_last=3)
    save(store, 5)
    store.save(5, {"note": "current"}, {"weights": {"w": torch.full((4,), -1.0)}},
               {"optimizer": {"step": 5}})
    latest = store.latest()
    assert latest is not None and latest.meta["note"] == "current"
    assert latest.tensors("weights")["w"][0] == -1.0
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000005"]


def test_a_crash_while_replacing_keeps_the_old_checkpoint_of_that_step(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save(CheckpointStore(root, keep_last=3), 4)
    # Where a save that replaces step 4 is between its two renames: the old folder moved
    # aside, the new one not yet in place.
    (root / "step-00000004").rename(root / ".replaced-step-00000004-999")
    latest = CheckpointStore(root, keep_last=3).latest()
    assert latest is not None and latest.step == 4 and latest.meta["note"] == "step 4"
    assert not list(root.glob(".replaced-*"))


def test_a_crash_after_the_new_folder_was_written_keeps_the_new_one(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save(CheckpointStore(root, keep_last=3), 4)
    elsewhere = CheckpointStore(tmp_path / "other", keep_last=3)
    elsewhere.save(4, {"note": "current"}, {"weights": {"w": torch.full((4,), -4.0)}},
                   {"optimizer": {"step": 4}})
    # Between the two renames of a replacement: the new folder written and fsynced under its
    # temporary name, the old one moved aside.
    (tmp_path / "other/step-00000004").rename(root / ".tmp-step-00000004-999")
    (root / "step-00000004").rename(root / ".replaced-step-00000004-999")
    latest = CheckpointStore(root, keep_last=3).latest()
    assert latest is not None and latest.step == 4 and latest.meta["note"] == "current"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]
