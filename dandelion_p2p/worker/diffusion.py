"""The diffusion training objective: noise, timesteps, targets and min-SNR weights.

Noise and timestep of a sample are drawn from a generator seeded by (seed, global step,
image hash), not from a global RNG: a sample gets the same noise whichever peer trains it and
however the batch is split, which is what lets a swarm's average equal one big batch and a
resumed run equal an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import blake3
import torch


def sample_generator(seed: int, step: int, content_hash: str) -> torch.Generator:
    digest = blake3.blake3(f"{seed}:{step}:{content_hash}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def draw_noise(
    latents: torch.Tensor,
    seed: int,
    step: int,
    hashes: Sequence[str],
    num_timesteps: int,
    noise_offset: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise like ``latents``, timesteps), one generator per sample."""
    noises, steps = [], []
    shape = latents.shape[1:]
    for content_hash in hashes:
        g = sample_generator(seed, step, content_hash)
        noise = torch.randn(shape, generator=g)
        if noise_offset:
            # Offset noise: a per-channel constant lets the model shift overall brightness.
            noise = noise + noise_offset * torch.randn((shape[0], 1, 1), generator=g)
        noises.append(noise)
        steps.append(torch.randint(0, num_timesteps, (1,), generator=g))
    return (torch.stack(noises).to(latents.device, latents.dtype),
            torch.cat(steps).to(latents.device))


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def loss_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction: str
) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023); ones when ``gamma`` is 0."""
    if gamma <= 0:
        return torch.ones(timesteps.shape, device=timesteps.device)
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1.0) if prediction == "v_prediction" else clipped / s


def target_for(scheduler: object, latents: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor, prediction: str) -> torch.Tensor:
    if prediction == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)  # type: ignore[attr-defined]
    return noise
