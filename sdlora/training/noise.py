"""The noise a step trains on, with kohya's options (their names and formulas, sd-scripts' custom_train_functions
and train_util): multi-resolution noise, input perturbation and the timestep range. Every random number comes from
the step's generator, so a resumed run replays them (step.py's reproducibility contract)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def timesteps(n: int, num_train_timesteps: int, min_timestep: int | None, max_timestep: int | None,
              gen: torch.Generator) -> torch.Tensor:
    """n timesteps drawn uniformly from [--min_timestep, --max_timestep) (kohya's get_timesteps: one value when
    the range is empty)."""
    low = 0 if min_timestep is None else min_timestep
    high = num_train_timesteps if max_timestep is None else max_timestep
    if low < high:
        return torch.randint(low, high, (n,), generator=gen)
    return torch.full((n,), high, dtype=torch.long)


def multires(noise: torch.Tensor, iterations: int, discount: float, gen: torch.Generator) -> torch.Tensor:
    """kohya's pyramid_noise_like: noise plus `iterations` levels of upsampled coarser noise, level i at a random
    scale r^i (r in [2, 4)) weighted discount^i, stopping at 1 pixel; rescaled to unit standard deviation."""
    b, c, h, w = noise.shape
    noise = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=gen)) * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        noise += F.interpolate(torch.randn((b, c, hn, wn), generator=gen), size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def perturbed(noise: torch.Tensor, gamma: float | None, random_strength: bool, gen: torch.Generator) -> torch.Tensor:
    """The noise the latent is noised with under input perturbation (Ning et al. 2023, kohya's --ip_noise_gamma):
    noise + γ·ξ, γ drawn from [0, gamma) with --ip_noise_gamma_random_strength; the target keeps `noise`."""
    if not gamma:
        return noise
    strength = float(torch.rand((), generator=gen)) * gamma if random_strength else gamma
    return noise + strength * torch.randn(noise.shape, generator=gen)


def check(config) -> None:
    """The noise flags' ranges, before any model loads (one line each)."""
    from ..errors import UserError

    low, high = config.min_timestep, config.max_timestep
    if (low is not None and low < 0) or (high is not None and high < 1) or (None not in (low, high) and low > high):
        raise UserError(f"--min_timestep {low} / --max_timestep {high}: need 0 <= min <= max, max >= 1 (timesteps "
                        "are drawn from [min, max))")
    if config.multires_noise_iterations is not None and config.multires_noise_iterations < 1:
        raise UserError(f"--multires_noise_iterations must be >= 1 (got {config.multires_noise_iterations})")
    if config.ip_noise_gamma is not None and config.ip_noise_gamma < 0:
        raise UserError(f"--ip_noise_gamma must be >= 0, e.g. 0.1 (got {config.ip_noise_gamma})")
    if config.loss_type in ("huber", "smooth_l1") and not 0 < config.huber_c <= 1:
        raise UserError(f"--huber_c must be in (0, 1], e.g. 0.1 (got {config.huber_c})")
