"""The training loss: per-sample denoising error, its timestep weighting, and how loss groups add up.

A new weighting (e.g. another SNR scheme or a per-pixel mask) goes in `per_sample_loss`; a new kind
of example with its own weight (e.g. regularisation images) is a new loss group of the recipe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def target(noise_scheduler, latents, noise, timesteps):
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
    if noise_scheduler.config.prediction_type == "epsilon":
        return noise
    return noise_scheduler.get_velocity(latents, noise, timesteps)


def snr_weights(noise_scheduler, timesteps, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), as diffusers' scripts compute them."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1)
    # min(snr, γ) / snr is 1 for every snr below γ, so 1 at the zero SNR of --zero_terminal_snr's last step (not 0/0)
    return torch.where(snr > 0, torch.clamp(snr, max=gamma) / snr.clamp(min=torch.finfo(snr.dtype).tiny),
                       torch.ones_like(snr))


def per_sample_loss(pred, target_, noise_scheduler, timesteps, snr_gamma: float | None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (in fp32), Min-SNR weighted when snr_gamma is set.

    `mask` ([B, 1, h, w] in [0, 1], --masked_loss) weighs each latent pixel; the mean stays over the
    whole latent, as kohya's masked loss, so a mostly-masked image contributes less."""
    err = F.mse_loss(pred.float(), target_.float(), reduction="none")
    if mask is not None:
        err = err * mask.to(err)
    loss = err.mean(dim=(1, 2, 3))
    if snr_gamma:
        loss = loss * snr_weights(noise_scheduler, timesteps, snr_gamma).to(loss)
    return loss


def group_loss(per_sample: torch.Tensor, groups: torch.Tensor, weights: dict[int, float]):
    """Σ_g w_g · mean(loss of rows in group g); also returns each group's mean for logging."""
    total, parts = per_sample.new_zeros(()), {}
    for g, w in weights.items():
        mask = groups == g
        if mask.any():
            parts[g] = per_sample[mask].mean()
            total = total + w * parts[g]
    return total, parts
