"""`make demo` fails when its peers end with different weights, and keeps what it made."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dandelion_p2p.demo import final_weights_mismatch
from dandelion_p2p.demo_output import (
    SUMMARY,
    OutputFolderError,
    check_export,
    check_login,
    keep_results,
    login_link,
    prepare_output,
    write_summary,
)
from dandelion_p2p.netlab import netlab_unavailable_reason
from dandelion_p2p.worker.checkpoint import CheckpointStore


def save_weights(work: Path, step: int, weights: dict[str, torch.Tensor]) -> None:
    CheckpointStore(work / "checkpoints", keep_last=2).save(
        step, {}, {"trainable": weights}, {"optimizer": {}}
    )


def test_equal_final_weights_pass(tmp_path: Path) -> None:
    weights = {"unet.a": torch.arange(6.0), "unet.b": torch.ones(2, 2)}
    for peer in ("alice", "bob"):
        save_weights(tmp_path / peer, 4, {"unet.a": torch.zeros(6)})
        save_weights(tmp_path / peer, 8, {k: v.clone() for k, v in weights.items()})
    assert final_weights_mismatch({p: tmp_path / p for p in ("alice", "bob")}) is None


def test_different_final_weights_are_named(tmp_path: Path) -> None:
    save_weights(tmp_path / "alice", 8, {"unet.a": torch.arange(6.0), "unet.b": torch.ones(2)})
    bob_b = torch.ones(2)
    bob_b[1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    save_weights(tmp_path / "bob", 8, {"unet.a": torch.arange(6.0), "unet.b": bob_b})
    problem = final_weights_mismatch({p: tmp_path / p for p in ("alice", "bob")})
    assert problem is not None and "unet.b" in problem and "unet.a" not in problem


def test_peers_that_ended_at_different_steps_or_without_weights_fail(tmp_path: Path) -> None:
    save_weights(tmp_path / "alice", 8, {"unet.a": torch.zeros(3)})
    save_weights(tmp_path / "bob", 4, {"unet.a": torch.zeros(3)})
    works = {p: tmp_path / p for p in ("alice", "bob")}
    problem = final_weights_mismatch(works)
    assert problem is not None and "step 8" in problem and "step 4" in problem
    problem = final_weights_mismatch({**works, "carol": tmp_path / "carol"})
    assert problem is not None and "carol" in problem


# What the demo keeps: its output folder, the login link, and the checks on the kept model.


def fake_work(work: Path, model: Path | None, images: int = 2) -> None:
    """A worker folder laid out as a finished run leaves it: sample images and an export."""
    from PIL import Image

    (work / "samples").mkdir(parents=True)
    for i in range(images):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(work / "samples" / f"step-24-raw-{i:02d}.png")
    if model is not None:
        from dandelion_p2p.runconfig.schema import ModelConfig
        from dandelion_p2p.worker.model import load_components
        from dandelion_p2p.worker.singlefile import save_single_file

        export = work / "export" / "demo-step-00000024"
        shutil.copytree(model, export / "diffusers")
        save_single_file(load_components(ModelConfig(base=str(model))),
                         export / "demo-step-00000024.safetensors", dtype=torch.float32)
        (export / "export.json").write_text(json.dumps({"run": "demo", "step": 24}))


def test_results_are_kept_and_the_model_loads(tmp_path: Path, tiny_sd1: Path) -> None:
    fake_work(tmp_path / "alice", tiny_sd1)
    fake_work(tmp_path / "bob", None, images=3)
    output = prepare_output(tmp_path / "out")
    kept, problems = keep_results(output, {p: tmp_path / p for p in ("alice", "bob")})
    # bob exported nothing: said, and alice's model is kept all the same
    assert problems == ["bob exported no model"]
    assert len(list((output / "samples" / "alice").glob("*.png"))) == 2
    assert len(list((output / "samples" / "bob").glob("*.png"))) == 3
    assert kept["model"]["from"] == "alice"
    assert check_export(output / "model") is None
    write_summary(output, {"problems": problems, **kept})
    summary = json.loads((output / SUMMARY).read_text())
    assert summary["model"]["export"] == "demo-step-00000024"


def test_a_broken_or_missing_export_is_a_problem(tmp_path: Path, tiny_sd1: Path) -> None:
    fake_work(tmp_path / "alice", tiny_sd1, images=0)
    (tmp_path / "alice" / "export" / "demo-step-00000024" / "diffusers" / "unet" /
     "config.json").write_text("{not json")
    output = prepare_output(tmp_path / "out")
    _, problems = keep_results(output, {"alice": tmp_path / "alice"})
    assert problems[0] == "alice wrote no sample images"
    assert len(problems) == 2 and "does not load in diffusers" in problems[1]
    shutil.rmtree(output / "model" / "diffusers")
    assert "no diffusers folder" in (check_export(output / "model") or "")


def test_output_folder_is_replaced_only_when_a_demo_wrote_it(tmp_path: Path) -> None:
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(OutputFolderError, match="not empty"):
        prepare_output(mine)
    assert (mine / "thesis.txt").read_text() == "years of work"

    earlier = prepare_output(tmp_path / "demo-output")
    (earlier / "samples" / "alice").mkdir(parents=True)
    (earlier / "samples" / "alice" / "old.png").write_bytes(b"png")
    (earlier / "keep-me.txt").write_text("the user's")
    write_summary(earlier, {})
    again = prepare_output(tmp_path / "demo-output")
    assert again == earlier.resolve()
    assert not (again / "samples").exists() and not (again / SUMMARY).exists()
    assert (again / "keep-me.txt").read_text() == "the user's"


def test_login_link_carries_the_token(tmp_path: Path) -> None:
    assert login_link(tmp_path, "http://127.0.0.1:4080/") is None  # no token file yet
    (tmp_path / "webui.token").write_text("abc-123\n")
    assert login_link(tmp_path, "http://127.0.0.1:4080/") == "http://127.0.0.1:4080/?token=abc-123"
    assert login_link(tmp_path, "off") is None


@pytest.mark.slow
@pytest.mark.timeout(1800)  # minutes on two idle cores, many more on a loaded machine
@pytest.mark.parametrize("nat", ["simulated", pytest.param("real", marks=pytest.mark.netlab)])
def test_demo_runs_end_to_end_and_keeps_its_results(tmp_path: Path, nat: str) -> None:
    """The real ``make demo`` command: three processes train, and the output folder holds
    every peer's sample images and an exported model that diffusers loads."""
    if nat == "real" and (reason := netlab_unavailable_reason()) is not None:
        pytest.skip(f"network lab unavailable: {reason}")
    output = tmp_path / "kept"
    demo = subprocess.Popen([sys.executable, "-m", "dandelion_p2p.demo", "--output", str(output),
                             "--nat", nat], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = demo.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        demo.terminate()  # the demo stops its daemons and removes its namespaces on SIGTERM
        stdout, stderr = demo.communicate(timeout=120)
    assert demo.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "web UI while the demo runs: http://127.0.0.1:" in stdout
    assert "?token=" in stdout
    said = "Real NATs (" if nat == "real" else "The NAT is simulated ("
    assert said in stdout
    summary = json.loads((output / SUMMARY).read_text())
    assert summary["problems"] == [] and summary["final_weights"] == "bit-identical"
    for peer in ("alice", "bob"):
        assert len(list((output / "samples" / peer).glob("*.png"))) == 2
    assert check_export(output / "model") is None


def test_a_login_link_nobody_answers_is_reported() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    problem = check_login(f"http://127.0.0.1:{port}/?token=abc")
    assert problem is not None and problem.startswith("the login link does not open")
