"""The training loss: per-sample denoising error, its timestep weighting, and how loss groups add up.

A new weighting (e.g. another SNR scheme or a per-pixel mask) goes in `per_sample_loss`; a new kind
of example with its own weight (e.g. regularisation images) is a new loss group of the recipe.
"""
from __future__ import annotations

import math

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
                    mask: torch.Tensor | None = None, options=None) -> torch.Tensor:
    """Mean squared error per sample (in fp32), Min-SNR weighted when snr_gamma is set; `options` (the run's
    settings) choose kohya's other element losses and weightings, in kohya's order.

    `mask` ([B, 1, h, w] in [0, 1], --masked_loss) weighs each latent pixel; the mean stays over the
    whole latent, as kohya's masked loss, so a mostly-masked image contributes less."""
    loss_type = getattr(options, "loss_type", "l2")
    if loss_type == "l2":
        err = F.mse_loss(pred.float(), target_.float(), reduction="none")
    else:
        c = huber_threshold(options, noise_scheduler, timesteps)
        err = element_loss(pred.float(), target_.float(), loss_type, c)
    if mask is not None:
        err = err * mask.to(err)
    loss = err.mean(dim=(1, 2, 3))
    if snr_gamma:
        loss = loss * snr_weights(noise_scheduler, timesteps, snr_gamma).to(loss)
    return loss if options is None else kohya_weights(loss, options, noise_scheduler, timesteps)


def element_loss(pred, target_, loss_type: str, c: torch.Tensor | None) -> torch.Tensor:
    """kohya's conditional_loss, per element: l1, or the pseudo-Huber 2c(sqrt(d² + c²) - c) ("huber") and
    2(sqrt(d² + c²) - c) ("smooth_l1") with a threshold c per sample."""
    if loss_type == "l1":
        return F.l1_loss(pred, target_, reduction="none")
    c = c.view(-1, *([1] * (pred.ndim - 1))).to(pred)
    soft = torch.sqrt((pred - target_) ** 2 + c ** 2) - c
    return 2 * c * soft if loss_type == "huber" else 2 * soft


def huber_threshold(options, noise_scheduler, timesteps) -> torch.Tensor | None:
    """kohya's get_huber_threshold_if_needed: --huber_c per sample, constant, decaying exponentially over the
    timesteps, or following the noise level ("snr": (1 - c) / (1 + σ_t)² + c)."""
    if options.loss_type not in ("huber", "smooth_l1"):
        return None
    c, scale, t = options.huber_c, options.huber_scale, timesteps
    if options.huber_schedule == "exponential":
        alpha = -math.log(c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-alpha * t) * scale
    if options.huber_schedule == "snr":
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(t.device)[t]
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return (1 - c) / (1 + sigmas) ** 2 + c
    return torch.full(t.shape, c * scale, device=t.device)


def kohya_weights(loss, options, noise_scheduler, timesteps) -> torch.Tensor:
    """kohya's per-sample weightings after Min-SNR, in its order: --scale_v_pred_loss_like_noise_pred (×
    SNR/(SNR+1)), --v_pred_like_loss (+ loss·(SNR+1)/SNR·v), --debiased_estimation_loss (× 1/sqrt(SNR), v-prediction
    1/(SNR+1)); the SNR clamped at 1000 as kohya clamps it."""
    if not (options.scale_v_pred_loss_like_noise_pred or options.v_pred_like_loss or options.debiased_estimation_loss):
        return loss
    from diffusers.training_utils import compute_snr

    snr = torch.clamp(compute_snr(noise_scheduler, timesteps), max=1000).to(loss)
    scale = snr / (snr + 1)
    if options.scale_v_pred_loss_like_noise_pred:
        loss = loss * scale
    if options.v_pred_like_loss:
        loss = loss + loss / scale * options.v_pred_like_loss
    if options.debiased_estimation_loss:
        v = noise_scheduler.config.prediction_type == "v_prediction"
        loss = loss * (1 / (snr + 1) if v else 1 / torch.sqrt(snr))
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
