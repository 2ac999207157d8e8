"""The trainer's CUDA paths on tiny random models: fp16 and bf16 autocast over fp32 master
weights, 8-bit AdamW, resuming, attention selection, and the EMA kept in host memory.

Skipped where torch sees no CUDA device."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.ema import Ema
from dandelion_p2p.worker.feeds import Batch, Position
from dandelion_p2p.worker.link import SoloLink
from dandelion_p2p.worker.train import Trainer, WorkerOptions
from tests.worker.runconfigs import tiny_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Deterministic cuBLAS needs this before its first use in the process; harmless elsewhere.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def cuda_trainer(config: RunConfig, images: Path, work: Path, **options: object) -> Trainer:
    toml = work.parent / f"{work.name}-{config.name}.toml"
    toml.parent.mkdir(parents=True, exist_ok=True)
    toml.write_text(config.to_toml())
    settings: dict[str, object] = {"device": "cuda", "export": False, **options}
    trainer = Trainer(config, WorkerOptions(data=images, work_dir=work, **settings),  # type: ignore[arg-type]
                      SoloLink(toml))
    trainer.resume()
    return trainer


def train(config: RunConfig, images: Path, work: Path, **options: object) -> Trainer:
    trainer = cuda_trainer(config, images, work, **options)
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer


def logged_losses(work: Path) -> list[float]:
    lines = (work / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def fixed_batch_loss(trainer: Trainer, batch: Batch) -> float:
    """Mean loss on one batch with the noise and timesteps of step 0, whatever the step:
    comparable before and after training, unlike the per-step losses."""
    position = trainer.position.global_step
    trainer.position.global_step = 0
    try:
        loss = trainer.forward_backward(batch)
    finally:
        trainer.position.global_step = position
        trainer.optimizer.zero_grad(set_to_none=True)
    return loss / len(batch.samples)


@pytest.fixture
def deterministic() -> Iterator[None]:
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = was_cudnn


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """Full fp32 arithmetic: cuDNN convolutions otherwise run in TF32 on Ampere and later."""
    was = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = was


@pytest.mark.parametrize(("precision", "dtype"),
                         [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_mixed_precision_trains_over_fp32_master_weights(
    precision: str, dtype: torch.dtype, tiny_sd1: Path, images: Path, tmp_path: Path
) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    config = tiny_run(tiny_sd1, training={"max_steps": 10, "batch_size": 4, "ema": True},
                      sync={"local_steps": 5}, checkpoint={"every_steps": 10, "keep_last": 1})
    work = tmp_path / "work"
    trainer = cuda_trainer(config, images, work, mixed_precision=precision)
    assert trainer.autocast_dtype == dtype
    assert trainer.scaler.is_enabled() == (dtype == torch.float16)
    computed_in: set[torch.dtype] = set()
    hook = trainer.c.unet.conv_in.register_forward_hook(
        lambda _module, _inputs, output: computed_in.add(output.dtype)
    )
    batch = trainer.feed.next_batch(Position())
    try:
        before = fixed_batch_loss(trainer, batch)
        trainer.run()
        after = fixed_batch_loss(trainer, batch)
    finally:
        hook.remove()
        trainer.close()

    assert computed_in == {dtype}, "the UNet runs under autocast"
    losses = logged_losses(work)
    assert len(losses) == 10 and all(math.isfinite(loss) for loss in losses), losses
    assert after < 0.9 * before, (before, after)
    for name, param in trainer.c.trainable:
        assert param.dtype == torch.float32 and param.device.type == "cuda", name
        assert bool(torch.isfinite(param).all()), name
    assert trainer.ema is not None
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in trainer.ema.shadow)
    if dtype == torch.float16:
        scale = trainer.scaler.get_scale()
        assert math.isfinite(scale) and scale > 0


def test_eight_bit_adamw_is_used_on_cuda(tiny_sd1: Path, images: Path, tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    config = tiny_run(tiny_sd1, training={"max_steps": 2}, sync={"local_steps": 2},
                      optimizer={"name": "adamw8bit", "lr": 1e-3})
    trainer = cuda_trainer(config, images, tmp_path / "work")
    start = [param.detach().clone() for _, param in trainer.c.trainable]
    try:
        trainer.run()
    finally:
        trainer.close()

    assert isinstance(trainer.optimizer, bnb.optim.AdamW8bit)
    states = [trainer.optimizer.state[param] for _, param in trainer.c.trainable]
    assert all(state for state in states), "every parameter has optimizer state"
    quantized = [s for s in states if s["state1"].dtype == torch.uint8]
    assert quantized, "large tensors keep their Adam moments in 8 bits"
    assert all(s["state1"].device.type == "cuda" for s in states)
    moved = sum(not torch.equal(a, param) for a, (_, param) in zip(start, trainer.c.trainable,
                                                                   strict=True))
    assert moved == len(start)


def test_a_resumed_cuda_run_equals_an_uninterrupted_one(
    tiny_sd1: Path, images: Path, tmp_path: Path, deterministic: None
) -> None:
    # The whole state a CUDA run carries: fp16 loss scale, 8-bit Adam moments, CUDA RNG,
    # outer momentum, host-memory EMA. Blocking rounds: a stop with an overlapped round in
    # flight applies it early, equal only to float rounding (test_overlap.py).
    config = tiny_run(tiny_sd1, training={"max_steps": 6, "ema": True},
                      optimizer={"name": "adamw8bit", "lr": 1e-3}, sync={"overlap": False},
                      checkpoint={"every_steps": 2, "keep_last": 2})
    straight = train(config, images, tmp_path / "straight", mixed_precision="fp16")
    interrupted = train(config, images, tmp_path / "resumed", mixed_precision="fp16", stop_at=3)
    assert interrupted.position.global_step == 3
    resumed = train(config, images, tmp_path / "resumed", mixed_precision="fp16")

    assert resumed.position.global_step == straight.position.global_step == 6
    assert straight.scaler.get_scale() == resumed.scaler.get_scale()
    for (name, a), (_, b) in zip(straight.c.trainable, resumed.c.trainable, strict=True):
        assert torch.equal(a, b), f"{name}: max difference {(a - b).abs().max().item()}"
    assert straight.ema is not None and resumed.ema is not None
    for name, a, b in zip(straight.ema.names, straight.ema.shadow, resumed.ema.shadow,
                          strict=True):
        assert torch.equal(a, b), f"EMA {name}: max difference {(a - b).abs().max().item()}"


def test_smaller_forward_passes_learn_the_same_on_cuda(
    tiny_sd1: Path, images: Path, tmp_path: Path, exact_fp32: None
) -> None:
    # In fp32: with autocast a split batch rounds differently, which is no error.
    config = tiny_run(tiny_sd1, training={"max_steps": 2, "batch_size": 4},
                      optimizer={"name": "adamw", "lr": 2e-2, "eps": 0.1},
                      sync={"local_steps": 2})
    whole = train(config, images, tmp_path / "whole", mixed_precision="no")
    split = train(config, images, tmp_path / "split", mixed_precision="no", micro_batch=1)
    for (name, a), (_, b) in zip(whole.c.trainable, split.c.trainable, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (
            f"{name}: max difference {(a - b).abs().max().item()}")


def test_gradient_mode_averages_cuda_gradients_through_host_memory(
    tiny_sd1: Path, images: Path, tmp_path: Path
) -> None:
    config = tiny_run(tiny_sd1, training={"max_steps": 2, "batch_size": 2},
                      sync={"mode": "gradient", "target_batch": 4})
    work = tmp_path / "work"
    trainer = cuda_trainer(config, images, work, mixed_precision="fp16")
    start = [param.detach().clone() for _, param in trainer.c.trainable]
    try:
        trainer.run()
    finally:
        trainer.close()
    assert trainer.position.global_step == 2
    assert trainer.position.batches_done == 4, "two batches of 2 make each step's 4 samples"
    assert all(math.isfinite(loss) for loss in logged_losses(work))
    for a, (name, param) in zip(start, trainer.c.trainable, strict=True):
        assert param.device.type == "cuda" and not torch.equal(a, param), name


@pytest.mark.parametrize("wanted", ["sdpa", "xformers"])
def test_attention_falls_back_to_sdpa_without_xformers(
    wanted: str, tiny_sd1: Path, images: Path, tmp_path: Path
) -> None:
    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    config = tiny_run(tiny_sd1, training={"max_steps": 1}, sync={"local_steps": 1})
    trainer = train(config, images, tmp_path / "work", attention=wanted)
    assert trainer.attention == "sdpa"
    assert trainer.position.global_step == 1
    assert all(math.isfinite(loss) for loss in logged_losses(tmp_path / "work"))


def test_the_host_memory_ema_sees_the_weights_the_gpu_holds() -> None:
    weight = torch.nn.Parameter(torch.zeros(4096, 4096, device="cuda"))
    ema = Ema([("w", weight)], decay=0.999, device=torch.device("cpu"))
    # Keep the stream busy so that the new weights land well after the update is asked for.
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        busy = torch.tanh(busy @ busy)
    with torch.no_grad():
        weight.copy_(busy.abs().clamp(max=0).add_(1.0))
    ema.update()

    first_decay = 2 / 11  # the warm-up's decay at the first update
    assert torch.allclose(ema.shadow[0], torch.full((4096, 4096), 1.0 - first_decay))
