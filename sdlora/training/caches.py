"""Encode once: VAE latent distributions per image and text embeddings per caption, when they can't change.

With no random flip/crop an image's pixels are the same every epoch, so its latent *distribution*
(mean | log-variance) is cached and a fresh sample is drawn from it every step; with a frozen text
encoder each caption's embedding is cached. The VAE and text encoder then leave the training device.
"""
from __future__ import annotations

import torch

from .. import models
from ..data.trainset import TrainSet


def plan(config, data: TrainSet) -> tuple[bool, bool, str]:
    """(cache latents?, cache text embeddings?, why not — for the log)."""
    latents = not config.no_cache and data.deterministic()
    varies = data.caption_ops is not None and data.caption_ops.varies
    text = (not config.no_cache or config.pre_compute_text_embeddings) and not config.train_text_encoder and not varies
    why_not = ["--no_cache"] * bool(config.no_cache) + \
              ["random flip/crop changes the pixels every epoch"] * (not config.no_cache and not latents) + \
              ["the text encoder is being trained"] * bool(config.train_text_encoder) + \
              ["caption shuffling/tag dropout changes captions every step"] * varies
    return latents, text, "; ".join(why_not)


def all_captions(data: TrainSet) -> list[str]:
    caps = [""] if data.caption_ops is not None and data.caption_ops.dropout_rate > 0 else []  # a dropped caption
    for r in data.rows:
        caps += r.caption if isinstance(r.caption, list) else [r.caption]
    return caps


class Caches:
    """VAE latent distributions per row and text embeddings per caption, computed once per run."""

    def __init__(self):
        self.latents: torch.Tensor | None = None  # [rows, 2C, h, w]: mean | logvar
        self.embeds: torch.Tensor | None = None
        self.caption_ids: dict[str, int] = {}

    @torch.no_grad()
    def build_latents(self, data: TrainSet, seed: int, vae, device, dtype, batch: int, progress: bool):
        from tqdm.auto import tqdm

        out = []
        ids = list(range(len(data.rows)))
        for s in tqdm(range(0, len(ids), batch), desc="caching latents", disable=not progress):
            px = torch.stack([data.load_row(r, seed, epoch=0) for r in ids[s:s + batch]]).to(device, dtype)
            out.append(vae.encode(px).latent_dist.parameters.float().cpu())
        self.latents = torch.cat(out)

    @torch.no_grad()
    def build_embeds(self, captions: list[str], text_encoder, tokenizer, max_length, use_mask, batch: int = 32):
        unique = sorted(set(captions))
        self.caption_ids = {c: i for i, c in enumerate(unique)}
        self.embeds = torch.cat([
            models.encode_prompts(text_encoder, tokenizer, unique[s:s + batch], max_length, use_mask).cpu()
            for s in range(0, len(unique), batch)
        ])

    def embeddings(self, captions: list[str]) -> torch.Tensor:
        return self.embeds[[self.caption_ids[c] for c in captions]]
