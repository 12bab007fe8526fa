"""The validation loss: the denoising loss on held-out images, at fixed noise and timesteps.

Each held-out image is encoded once (its posterior mean, centre-cropped in its bucket) and noised at
TIMESTEPS timesteps spread evenly over the schedule, with noise seeded by the image's index, so the
same LoRA weights always give the same number and a rise means over-training, not sampling luck.
"""
from __future__ import annotations

import torch

from ..data.trainset import TrainSet
from .caches import Caches
from .validation import eval_mode

TIMESTEPS = 4


def encode(data: TrainSet, vae, device, dtype, batch: int) -> Caches:
    cache = Caches()
    cache.build_latents(data, 0, vae, device, dtype, batch, progress=False)
    return cache


def captions(data: TrainSet) -> list[str]:
    """Each held-out row's caption (the first of a list), never shuffled or dropped."""
    return [c[0] if isinstance(c, list) and c else c or "" for c in (r.caption for r in data.rows)]


@torch.no_grad()
def loss(data: TrainSet, cache: Caches, predict, num_train_timesteps: int, vae_scale: float, device,
         parts: dict) -> float:
    """Mean validation loss of the current LoRA over `data`'s held-out images (their latents in `cache`);
    `predict(lat, noise, t, captions, geometry, mask)` is the training step's per-sample loss, given the bare
    (un-wrapped) models; `parts`: the trained models, put in eval mode meanwhile. Main process only."""
    t = torch.tensor([int((k + 0.5) * num_train_timesteps / TIMESTEPS) for k in range(TIMESTEPS)], device=device)
    caps, total = captions(data), []
    with eval_mode(parts):
        for r in data.used_rows():
            post, mask = cache.latent_batch([r])
            lat = (post.chunk(2, dim=1)[0] * vae_scale).repeat(TIMESTEPS, 1, 1, 1).to(device)
            noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(r)).to(device)
            mask = None if mask is None else mask.repeat(TIMESTEPS, 1, 1, 1).to(device)
            geometry = torch.tensor([data.layout(r, 0, 0).geometry()]).repeat(TIMESTEPS, 1)
            total.append(predict(lat, noise, t, [caps[r]] * TIMESTEPS, geometry, mask))
    return torch.cat(total).mean().item()
