"""The denoising loss and the learning-rate schedule, from diffusers where it has them.

- `lr_factor(step, ...)`: diffusers' `get_scheduler` schedules (constant / cosine / linear, with linear warm-up),
  evaluated at the optimizer step, as diffusers' `train_text_to_image.py` does (warm-up starts at 0).
- `snr_weights`: Min-SNR-gamma (Hang et al. 2023) on diffusers' `compute_snr`.
- `diffusion_loss`: noise and timesteps drawn from a CPU generator (the same on any device), MSE per image,
  optionally SNR-weighted.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=8)
def _schedule(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    from diffusers.optimization import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    name = "constant_with_warmup" if schedule == "constant" and warmup else schedule
    sched = get_scheduler(name, optimizer=probe, num_warmup_steps=warmup, num_training_steps=max(total, 1))
    return sched.lr_lambdas[0]


def lr_factor(step: int, *, schedule: str, warmup: int, total: int) -> float:
    """The learning-rate multiplier for optimizer step `step` (0-based)."""
    return float(_schedule(schedule, int(warmup), int(total))(int(step)))


def snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma loss weights: min(SNR, gamma)/SNR, or /(SNR+1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1.0) if v_prediction else clipped / snr


def diffusion_loss(unet: Any, noise_scheduler: Any, latents: torch.Tensor, cond: torch.Tensor,
                   generator: torch.Generator, *, noise_offset: float, min_snr_gamma: Optional[float],
                   v_prediction: bool) -> torch.Tensor:
    """One denoising loss: noise and timesteps drawn from `generator` (CPU, so the same on any device)."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise += noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise = noise.to(latents.device, non_blocking=True)
    timesteps = timesteps.to(latents.device, non_blocking=True)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    pred = unet(noisy, timesteps, cond).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        loss = loss * snr_weights(noise_scheduler, timesteps, min_snr_gamma, v_prediction)
    return loss.mean()
