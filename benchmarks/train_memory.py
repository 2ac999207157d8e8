"""Peak memory and speed of one peer's training step: the full SD 1.5 UNet, batch 1, 512 px.

    .venv/bin/python benchmarks/train_memory.py                      # memory features on
    .venv/bin/python benchmarks/train_memory.py --sweep              # and each one off in turn
    .venv/bin/python benchmarks/train_memory.py --no-checkpointing --precision fp32 \
        --optimizer adamw                                            # everything off

The UNet is built from SD 1.5's config with random weights (nothing is downloaded) and trained
on random latents and random text embeddings: the VAE and the text encoder do not take part in
a training step once their outputs are cached, and the numbers of a step do not depend on the
weights' values. Model set-up and the step follow the worker (dandelion_p2p.worker): fp32
master weights, fp16/bf16 autocast with a gradient scaler for fp16, min-SNR-weighted noise
prediction, gradient clipping, 8-bit AdamW from bitsandbytes (torch AdamW where it cannot be
used), SDPA or xformers attention, gradient checkpointing.

With CUDA the table gives torch's peak allocated and reserved GPU memory over the whole run;
without it the tiny test model trains on the CPU and the table gives the peak resident memory
of the process instead (``--model sd15`` works on the CPU too, slowly: use a smaller
``--resolution`` and few ``--steps``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks import _report
from dandelion_p2p.runconfig.schema import ModelConfig, OptimizerConfig, TrainingConfig
from dandelion_p2p.worker import diffusion
from dandelion_p2p.worker.device import pick_precision
from dandelion_p2p.worker.model import (
    Components,
    load_components,
    make_optimizer,
    select_trainable,
    use_attention,
)

log = logging.getLogger("train_memory")

GIB = 2**30

# runwayml/stable-diffusion-v1-5, unet/config.json (the keys that shape the model).
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}
SD15_UNET_PARAMETERS = 859_520_964
SD15_TEXT_TOKENS = 77
VAE_SCALE = 8
"""Pixels per latent cell: a 512 px image is a 64x64 latent."""

PRECISIONS = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class Settings:
    model: str
    device: str
    resolution: int
    batch_size: int
    steps: int
    warmup: int
    checkpointing: bool
    precision: str
    optimizer: str
    attention: str
    seed: int


@dataclass
class Result:
    settings: Settings
    parameters: int
    optimizer_used: str
    attention_used: str
    text_tokens: int
    latent_size: int
    iterations_per_second: float
    step_seconds: list[float]
    losses: list[float]
    memory_kind: str
    """"cuda" (torch's allocator statistics) or "rss" (the process's peak resident memory)."""
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    weights_allocated_bytes: int | None
    peak_rss_bytes: int
    rss_before_model_bytes: int | None
    gpu_name: str | None


def current_rss() -> int | None:
    """Resident memory now, from /proc (None where there is none)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize()


def peak_rss() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def sd15_components() -> Components:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet: Any = UNet2DConditionModel(**SD15_UNET_CONFIG)
    count = sum(p.numel() for p in unet.parameters())
    if count != SD15_UNET_PARAMETERS:
        raise AssertionError(
            f"the SD 1.5 UNet config built {count:,} parameters, not {SD15_UNET_PARAMETERS:,}"
        )
    unet.requires_grad_(False)
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        clip_sample=False,
    )
    return Components(
        family="sd1", prediction="epsilon", unet=unet, vae=None, noise_scheduler=scheduler,
        tokenizers=[], text_encoders=[], source="sd15-config-random",
    )


def tiny_components(folder: Path) -> Components:
    """The tests' tiny pipeline, loaded through the worker's own loader."""
    from dandelion_p2p.worker.tiny import build_tiny_pipeline

    build_tiny_pipeline(folder, "sd1")
    return load_components(ModelConfig(base=str(folder), family="sd1"))


def text_tokens(c: Components) -> int:
    if c.tokenizers:
        return int(c.tokenizers[0].model_max_length)
    return SD15_TEXT_TOKENS


def run(settings: Settings) -> Result:
    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = current_rss()
    training = TrainingConfig(method="full", seed=settings.seed)
    optimizer_config = OptimizerConfig()  # the run config's defaults
    with tempfile.TemporaryDirectory(prefix="train-memory-") as tmp:
        c = sd15_components() if settings.model == "sd15" else tiny_components(Path(tmp))
        select_trainable(c, training, settings.seed)
        c.unet.to(device)
        # After the move, so that an xformers test op runs on the device that will use it.
        attention_used = use_attention(c, settings.attention)
        if settings.checkpointing:
            c.unet.enable_gradient_checkpointing()
        c.unet.train()
    params = [p for _, p in c.trainable]
    parameters = sum(p.numel() for p in params)
    weights_allocated = torch.cuda.memory_allocated() if device.type == "cuda" else None
    autocast_dtype = pick_precision(PRECISIONS[settings.precision], device)
    optimizer = make_optimizer(
        params, settings.optimizer, optimizer_config.lr,
        (optimizer_config.beta1, optimizer_config.beta2), optimizer_config.weight_decay,
        optimizer_config.eps,
    )
    optimizer_used = (
        "adamw8bit" if type(optimizer).__module__.startswith("bitsandbytes") else "adamw"
    )
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    latent_size = settings.resolution // VAE_SCALE
    tokens = text_tokens(c)
    cross_dim = int(c.unet.config.cross_attention_dim)
    generator = torch.Generator().manual_seed(settings.seed)
    scheduler = c.noise_scheduler

    def step(index: int) -> float:
        latents = torch.randn(
            settings.batch_size, c.unet.config.in_channels, latent_size, latent_size,
            generator=generator,
        ).to(device)
        text = torch.randn(settings.batch_size, tokens, cross_dim, generator=generator).to(device)
        hashes = [f"sample-{index}-{i}" for i in range(settings.batch_size)]
        noise, timesteps = diffusion.draw_noise(
            latents, settings.seed, index, hashes, scheduler.config.num_train_timesteps,
            training.noise_offset,
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = diffusion.target_for(scheduler, latents, noise, timesteps, c.prediction)
        weights = diffusion.loss_weights(
            scheduler.alphas_cumprod, timesteps, training.min_snr_gamma, c.prediction
        )
        autocast: contextlib.AbstractContextManager[Any] = (
            torch.autocast(device.type, dtype=autocast_dtype)
            if autocast_dtype is not None else contextlib.nullcontext()
        )
        with autocast:
            prediction = c.unet(noisy, timesteps, encoder_hidden_states=text).sample
        per_sample = (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * weights).sum()
        scaler.scale(loss).backward()
        scale = 1.0 / settings.batch_size
        for param in params:
            if param.grad is not None:
                param.grad.mul_(scale)
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        if optimizer_config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, optimizer_config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach()) / settings.batch_size
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {index}")
        return value

    losses: list[float] = []
    seconds: list[float] = []
    for index in range(settings.steps):
        started = time.perf_counter()
        losses.append(step(index))  # float() of the loss waits for the device
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if index >= settings.warmup:
            seconds.append(elapsed)
        log.info("step %d/%d: loss %.4f, %.2f s", index + 1, settings.steps, losses[-1],
                 elapsed)

    cuda = device.type == "cuda"
    return Result(
        settings=settings,
        parameters=parameters,
        optimizer_used=optimizer_used,
        attention_used=attention_used,
        text_tokens=tokens,
        latent_size=latent_size,
        iterations_per_second=len(seconds) / sum(seconds) if seconds else math.nan,
        step_seconds=seconds,
        losses=losses,
        memory_kind="cuda" if cuda else "rss",
        peak_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        peak_reserved_bytes=torch.cuda.max_memory_reserved() if cuda else None,
        weights_allocated_bytes=weights_allocated,
        peak_rss_bytes=peak_rss(),
        rss_before_model_bytes=rss_before,
        gpu_name=torch.cuda.get_device_name() if cuda else None,
    )


def gib(value: int | None) -> float | None:
    return None if value is None else value / GIB


def label(s: Settings) -> str:
    return (f"{s.precision} / {'ckpt' if s.checkpointing else 'no-ckpt'} / {s.optimizer}"
            f" / {s.attention}")


def table(results: list[Result]) -> str:
    first = results[0]
    s = first.settings
    where = first.gpu_name or "CPU"
    lines = [
        f"model {s.model} ({first.parameters:,} trained parameters) on {where}, "
        f"{s.resolution} px (latents {first.latent_size}x{first.latent_size}, "
        f"{first.text_tokens} text tokens), batch {s.batch_size}, {s.steps} steps "
        f"({s.warmup} not timed)",
    ]
    if first.memory_kind == "cuda":
        lines.append("memory: torch.cuda peak allocated / reserved over the whole run, GiB")
        headers = ["precision / checkpointing / optimizer / attention", "optimizer used",
                   "attention used", "it/s", "s/step p50", "weights GiB", "peak alloc GiB",
                   "peak reserved GiB"]
        rows = [[label(r.settings), r.optimizer_used, r.attention_used,
                 r.iterations_per_second, _report.median(r.step_seconds),
                 gib(r.weights_allocated_bytes),
                 gib(r.peak_allocated_bytes), gib(r.peak_reserved_bytes)] for r in results]
    else:
        lines.append("memory: no CUDA here, so the process's peak resident memory (RSS) on "
                     "the CPU, GiB; not VRAM")
        headers = ["precision / checkpointing / optimizer / attention", "optimizer used",
                   "attention used", "it/s", "s/step p50", "RSS before model GiB", "peak RSS GiB"]
        rows = [[label(r.settings), r.optimizer_used, r.attention_used,
                 r.iterations_per_second, _report.median(r.step_seconds),
                 gib(r.rss_before_model_bytes),
                 gib(r.peak_rss_bytes)] for r in results]
    return "\n".join([*lines, "", _report.format_table(headers, rows)])


def sweep_variants(base: Settings, cuda: bool) -> list[Settings]:
    """The memory features on, then each one turned off in turn, then all off."""
    from dataclasses import replace

    off = "fp32"
    variants = [base, replace(base, checkpointing=False), replace(base, optimizer="adamw")]
    if base.precision != off:
        variants.append(replace(base, precision=off))
    if cuda and base.precision != "fp16":
        variants.append(replace(base, precision="fp16"))
    variants.append(replace(base, checkpointing=False, optimizer="adamw", precision=off))
    unique: list[Settings] = []
    for v in variants:
        if v not in unique:
            unique.append(v)
    return unique


def run_in_child(settings: Settings, args: argparse.Namespace) -> Result:
    """One configuration in a fresh process, so that each peak is its own."""
    with tempfile.TemporaryDirectory(prefix="train-memory-") as tmp:
        out = Path(tmp) / "result.json"
        command = [
            sys.executable, str(Path(__file__).resolve()),
            "--model", settings.model, "--device", settings.device,
            "--resolution", str(settings.resolution), "--batch-size", str(settings.batch_size),
            "--steps", str(settings.steps), "--warmup", str(settings.warmup),
            "--precision", settings.precision, "--optimizer", settings.optimizer,
            "--attention", settings.attention, "--seed", str(settings.seed),
            "--json", str(out), "--quiet",
        ]
        if not settings.checkpointing:
            command.append("--no-checkpointing")
        if args.verbose:
            command.append("--verbose")
        subprocess.run(command, check=True)
        data = json.loads(out.read_text())["results"][0]
    data["settings"] = Settings(**data["settings"])
    return Result(**data)


def resolve(args: argparse.Namespace) -> Settings:
    cuda = torch.cuda.is_available()
    device = args.device if args.device != "auto" else ("cuda" if cuda else "cpu")
    if device == "cuda" and not cuda:
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    model = args.model if args.model != "auto" else ("sd15" if device == "cuda" else "tiny")
    resolution = args.resolution or (512 if model == "sd15" else 64)
    if resolution % VAE_SCALE:
        raise SystemExit(f"--resolution must be a multiple of {VAE_SCALE}")
    precision = args.precision
    if precision == "auto":
        dtype = pick_precision("auto", torch.device(device))
        precision = ("bf16" if dtype == torch.bfloat16
                     else "fp16" if dtype == torch.float16 else "fp32")
    if args.warmup >= args.steps:
        raise SystemExit("--steps must exceed --warmup (the untimed first steps)")
    return Settings(
        model=model, device=device, resolution=resolution, batch_size=args.batch_size,
        steps=args.steps, warmup=args.warmup, checkpointing=not args.no_checkpointing,
        precision=precision, optimizer=args.optimizer, attention=args.attention, seed=args.seed,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--model", choices=["auto", "sd15", "tiny"], default="auto",
                   help="auto: sd15 with CUDA, tiny on the CPU")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--resolution", type=int, default=0,
                   help="pixels (latents are 1/8); default 512 for sd15, 64 for tiny")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="first steps, not timed")
    p.add_argument("--no-checkpointing", action="store_true",
                   help="turn gradient checkpointing off")
    p.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                   help="autocast dtype (master weights stay fp32); auto: as the worker picks")
    p.add_argument("--optimizer", choices=["adamw8bit", "adamw"], default="adamw8bit")
    p.add_argument("--attention", choices=["sdpa", "xformers"], default="sdpa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true",
                   help="also run with each memory feature off (one process each)")
    p.add_argument("--json", help="result file (default benchmarks/results/train_memory-*.json)")
    p.add_argument("--quiet", action="store_true", help="no table (for --sweep's children)")
    p.add_argument("--verbose", action="store_true", help="log every step")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _report.exit_on_sigterm()
    settings = resolve(args)
    if args.sweep:
        results = [run_in_child(v, args) for v in sweep_variants(settings,
                                                                 settings.device == "cuda")]
    else:
        results = [run(settings)]
    payload = {
        "benchmark": "train_memory",
        "environment": {**_report.environment(), "torch": torch.__version__,
                        "cuda": torch.version.cuda},
        "results": [asdict(r) for r in results],
    }
    path = _report.write_json("train_memory", payload, args.json)
    if not args.quiet:
        print(table(results))
        print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
