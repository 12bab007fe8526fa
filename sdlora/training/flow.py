"""The rectified-flow objective of Stable Diffusion 3 / 3.5, as diffusers' examples/dreambooth/
train_dreambooth_lora_sd3.py computes it, with diffusers.training_utils' own density and weighting functions.

A timestep density u ~ --weighting_scheme (logit-normal by default) picks an index into the base's
FlowMatchEulerDiscreteScheduler schedule; its sigma mixes the clean latent and the noise, x_s = (1 - s) x0 + s n;
the transformer predicts the flow n - x0. With --precondition_outputs 1 (the script's default) the prediction is
turned into a clean-latent estimate, pred * (-s) + x_s, and regressed onto x0; else onto n - x0. The squared error
is weighted per sample by compute_loss_weighting_for_sd3 (1 except for sigma_sqrt / cosmap) and averaged per sample.
Every random number comes from the step's generator, so a resumed run replays the same timesteps."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Noised:
    """One batch noised for the transformer: its input, the timesteps it is told, and their sigmas [B, 1, 1, 1]."""
    noisy: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor


def latents(posterior_sample: torch.Tensor, vae_config) -> torch.Tensor:
    """A VAE sample in the transformer's latent space: shifted, then scaled (SD3's VAE has a shift_factor)."""
    return (posterior_sample - (vae_config.shift_factor or 0.0)) * vae_config.scaling_factor


def noise(sched, lat: torch.Tensor, noise_: torch.Tensor, config, gen: torch.Generator) -> Noised:
    """Draw timesteps by the settings' density and mix `lat` with `noise_` at their sigmas."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(config.weighting_scheme, lat.shape[0], config.logit_mean,
                                              config.logit_std, config.mode_scale, generator=gen)
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices].to(lat.device)
    sigmas = sched.sigmas.to(lat.device, lat.dtype)[indices.to(lat.device)].reshape(-1, *[1] * (lat.ndim - 1))
    return Noised((1.0 - sigmas) * lat + sigmas * noise_, timesteps, sigmas)


def per_sample_loss(pred: torch.Tensor, lat: torch.Tensor, noise_: torch.Tensor, noised: Noised, config,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted squared error per sample (fp32); `mask` ([B, 1, h, w], --masked_loss) weighs each latent pixel
    with the mean kept over the whole latent, as the other families' masked loss."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if config.precondition_outputs:
        pred, target = pred * (-noised.sigmas) + noised.noisy, lat
    else:
        target = noise_ - lat
    weighting = compute_loss_weighting_for_sd3(config.weighting_scheme, noised.sigmas)
    err = weighting.float() * (pred.float() - target.float()) ** 2
    if mask is not None:
        err = err * mask.to(err)
    return err.reshape(err.shape[0], -1).mean(dim=1)
