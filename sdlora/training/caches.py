"""Encode once: VAE latent distributions per image and text embeddings per caption, when they can't change.

With no random flip/crop an image's pixels are the same every epoch, so its latent *distribution*
(mean | log-variance) is cached and a fresh sample is drawn from it every step; with a frozen text
encoder each caption's embedding is cached. The VAE and text encoder then leave the training device.
"""
from __future__ import annotations

import torch

from ..data.trainset import TrainSet
from .conditioning import Text


def latent_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """A pixel mask [B, 1, H, W] averaged down to the latents' [h, w]: each latent pixel weighs as much
    as the share of its 8x8 patch that is to be learned."""
    return torch.nn.functional.interpolate(mask.float(), size=tuple(size), mode="area")


def plan(config, data: TrainSet) -> tuple[bool, bool, str]:
    """(cache latents?, cache text embeddings?, why not — for the log)."""
    latents = not config.no_cache and data.deterministic()
    varies = data.caption_ops is not None and data.caption_ops.varies
    text = (not config.no_cache or config.pre_compute_text_embeddings) and not config.train_text_encoder and not varies
    why_not = ["--no_cache"] * bool(config.no_cache) + \
              [_why_pixels_change(data)] * (not config.no_cache and not latents) + \
              ["the text encoder is being trained"] * bool(config.train_text_encoder) + \
              ["caption shuffling/tag dropout changes captions every step"] * varies
    return latents, text, "; ".join(why_not)


def _why_pixels_change(data: TrainSet) -> str:
    if data.random_flip:
        return "--random_flip changes the pixels every epoch"
    return "a random crop changes the pixels every epoch (--center_crop makes them cacheable)"


def all_captions(data: TrainSet) -> list[str]:
    caps = [""] if data.caption_ops is not None and data.caption_ops.dropout_rate > 0 else []  # a dropped caption
    for r in data.rows:
        caps += r.caption if isinstance(r.caption, list) else [r.caption]
    return caps


class Caches:
    """VAE latent distributions (and loss masks at latent size) per row and text embeddings per caption,
    computed once per run. Rows of different buckets have latents of different sizes."""

    def __init__(self):
        # bucket -> [rows, 2C, h, w] (mean | logvar), and row -> (bucket, index). Gathered from one tensor per
        # bucket, as the VAE laid it out in memory: a contiguous copy would change the UNet's rounding.
        self.latents: dict[tuple, torch.Tensor] | None = None
        self.where: dict[int, tuple[tuple, int]] = {}
        self.masks: dict[tuple, torch.Tensor] = {}  # bucket -> [rows, 1, h, w], when a row of it has a mask
        self.embeds: Text | None = None
        self.caption_ids: dict[str, int] = {}

    @torch.no_grad()
    def build_latents(self, data: TrainSet, seed: int, vae, device, dtype, batch: int, progress: bool):
        from tqdm.auto import tqdm

        by_bucket: dict = {}
        for r in data.used_rows():
            by_bucket.setdefault(data.buckets[r], []).append(r)
        runs = [(b, ids[s:s + batch]) for b, ids in by_bucket.items() for s in range(0, len(ids), batch)]
        posts, masks = {b: [] for b in by_bucket}, {b: [] for b in by_bucket}
        for b, ids in tqdm(runs, desc="caching latents", disable=not progress):
            px, m = zip(*[data.load_row(r, seed, epoch=0) for r in ids])
            posts[b].append(vae.encode(torch.stack(px).to(device, dtype)).latent_dist.parameters.float().cpu())
            masks[b] += m
        self.latents = {b: torch.cat(p) for b, p in posts.items()}
        self.where = {r: (b, i) for b, ids in by_bucket.items() for i, r in enumerate(ids)}
        for b, m in masks.items():
            if any(x is not None for x in m):
                ones = torch.ones_like(next(x for x in m if x is not None))
                self.masks[b] = latent_mask(torch.stack([x if x is not None else ones for x in m]),
                                            self.latents[b].shape[-2:])

    def __len__(self):
        return len(self.where)

    def latent_batch(self, row_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latent distributions of rows of one bucket, and their masks (None when none has one)."""
        bucket = self.where[row_ids[0]][0]
        idx = torch.tensor([self.where[r][1] for r in row_ids])
        mask = self.masks.get(bucket)
        return self.latents[bucket][idx], None if mask is None else mask[idx]

    @torch.no_grad()
    def build_embeds(self, captions: list[str], encode, batch: int = 32):
        """Each distinct caption's conditioning, `encode(texts) -> conditioning.Text`, kept on the CPU."""
        unique = sorted(set(captions))
        self.caption_ids = {c: i for i, c in enumerate(unique)}
        self.embeds = Text.cat([encode(unique[s:s + batch]).to("cpu") for s in range(0, len(unique), batch)])

    def embeddings(self, captions: list[str]) -> Text:
        return self.embeds[[self.caption_ids[c] for c in captions]]
