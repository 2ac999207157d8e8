"""benchmarks/train_memory.py on the tiny model, on the CPU: it trains, and its JSON holds
the settings asked for and plausible measurements."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from dandelion_p2p.worker.device import pick_precision

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_memory.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_memory_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up by name while the module is being executed.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=240, cwd=SCRIPT.parents[1])


@pytest.mark.slow  # ten seconds of a benchmark's own run; its argument checks run by default
def test_tiny_model_on_cpu_reports_rss_and_settings(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = run_script("--device", "cpu", "--steps", "4", "--warmup", "1",
                      "--no-checkpointing", "--optimizer", "adamw", "--precision", "bf16",
                      "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "peak resident memory (RSS)" in done.stdout
    assert "not VRAM" in done.stdout
    assert "bf16 / no-ckpt / adamw / sdpa" in done.stdout

    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "train_memory"
    [result] = payload["results"]
    settings = result["settings"]
    assert settings == {
        "model": "tiny", "device": "cpu", "resolution": 64, "batch_size": 1, "steps": 4,
        "warmup": 1, "checkpointing": False, "precision": "bf16", "optimizer": "adamw",
        "attention": "sdpa", "seed": 0,
    }
    assert result["optimizer_used"] == "adamw"
    assert result["attention_used"] == "sdpa"
    assert result["memory_kind"] == "rss"
    assert result["peak_allocated_bytes"] is None and result["peak_reserved_bytes"] is None
    assert result["peak_rss_bytes"] > 50 * 2**20
    assert result["rss_before_model_bytes"] <= result["peak_rss_bytes"]
    assert result["latent_size"] == 8 and result["text_tokens"] == 16
    assert 700_000 < result["parameters"] < 900_000
    assert len(result["step_seconds"]) == 3 and len(result["losses"]) == 4
    assert all(math.isfinite(x) and x > 0 for x in result["losses"])
    assert result["iterations_per_second"] == pytest.approx(3 / sum(result["step_seconds"]))


def test_bad_arguments_are_refused() -> None:
    # Both run at once: each spends its time importing before it looks at its arguments.
    with ThreadPoolExecutor(2) as pool:
        resolution = pool.submit(run_script, "--device", "cpu", "--resolution", "100")
        warmup = pool.submit(run_script, "--device", "cpu", "--steps", "2", "--warmup", "3")
        done = resolution.result()
        assert done.returncode != 0 and "multiple of 8" in done.stderr
        done = warmup.result()
        assert done.returncode != 0 and "--steps must exceed --warmup" in done.stderr


def test_the_benchmark_chooses_precision_as_the_worker_does() -> None:
    assert load_script().pick_precision is pick_precision


def test_sweep_turns_each_memory_feature_off() -> None:
    bench = load_script()
    base = bench.Settings(model="sd15", device="cuda", resolution=512, batch_size=1, steps=20,
                          warmup=3, checkpointing=True, precision="bf16",
                          optimizer="adamw8bit", attention="sdpa", seed=0)
    variants = bench.sweep_variants(base, cuda=True)
    assert variants[0] == base
    labels = [bench.label(v) for v in variants]
    assert labels == [
        "bf16 / ckpt / adamw8bit / sdpa",
        "bf16 / no-ckpt / adamw8bit / sdpa",
        "bf16 / ckpt / adamw / sdpa",
        "fp32 / ckpt / adamw8bit / sdpa",
        "fp16 / ckpt / adamw8bit / sdpa",
        "fp32 / no-ckpt / adamw / sdpa",
    ]


def test_sd15_config_has_the_published_parameter_count() -> None:
    bench = load_script()
    from diffusers import UNet2DConditionModel

    # The meta device builds the structure without allocating 3.4 GB of weights.
    with torch.device("meta"):
        unet: Any = UNet2DConditionModel(**bench.SD15_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == bench.SD15_UNET_PARAMETERS == 859_520_964
