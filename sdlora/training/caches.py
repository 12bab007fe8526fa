"""Encode once: VAE latent distributions per image and text embeddings per caption, when they can't change.

With no random flip/crop an image's pixels are the same every epoch, so its latent *distribution*
(mean | log-variance) is cached and a fresh sample is drawn from it every step; with a frozen text
encoder each caption's embedding is cached. The VAE and text encoder then leave the training device.
Latents live in RAM, or with --cache_latents_to_disk in a LatentStore (diskcache.py), read per batch.
"""
from __future__ import annotations

import logging

import torch

from ..data.trainset import TrainSet
from ..errors import UserError
from . import interrupt
from .conditioning import Text
from .diskcache import LatentStore

log = logging.getLogger("sdlora")


def latent_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """A pixel mask [B, 1, H, W] averaged down to the latents' [h, w]: each latent pixel weighs as much
    as the share of its 8x8 patch that is to be learned."""
    return torch.nn.functional.interpolate(mask.float(), size=tuple(size), mode="area")


def plan(config, data: TrainSet) -> tuple[bool, bool, str]:
    """(cache latents?, cache text embeddings?, why not — for the log)."""
    latents = not config.no_cache and data.deterministic()
    varies = data.captions_vary()
    text = (not config.no_cache or config.pre_compute_text_embeddings) and not config.train_text_encoder and not varies
    unused = ", so --cache_latents_to_disk is not used" * config.cache_latents_to_disk
    why_not = ["--no_cache"] * bool(config.no_cache) + \
              [_why_pixels_change(data) + unused] * (not config.no_cache and not latents) + \
              ["the text encoder is being trained"] * bool(config.train_text_encoder) + \
              ["caption shuffling/tag dropout changes captions every step"] * varies
    return latents, text, "; ".join(why_not)


def _why_pixels_change(data: TrainSet) -> str:
    if data.random_flip:
        return ("flip_aug" if data.parts else "--random_flip") + " changes the pixels every epoch"
    return "a random crop changes the pixels every epoch (--center_crop makes them cacheable)"


def all_captions(data: TrainSet) -> list[str]:
    caps = [""] if data.captions_drop() else []  # a dropped caption
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
        # --cache_latents_to_disk: the entries instead of `latents`/`masks`, each row's key, buckets with a mask
        self.store: LatentStore | None = None
        self.keys: dict[int, str] = {}
        self.masked: set[tuple] = set()
        self.reused = self.encoded = 0
        self.embeds: Text | None = None
        self.caption_ids: dict[str, int] = {}

    @torch.no_grad()
    def build_latents(self, data: TrainSet, seed: int, vae, device, dtype, batch: int, progress: bool,
                      store: LatentStore | None = None):
        """Encode the used rows in batches of one bucket. With a `store`, rows whose entry is there and sound are
        not encoded, the others are written as entries, and only their keys stay in memory."""
        from tqdm.auto import tqdm

        by_bucket: dict = {}
        for r in data.used_rows():
            by_bucket.setdefault(data.buckets[r], []).append(r)
        runs = [(b, ids[s:s + batch]) for b, ids in by_bucket.items() for s in range(0, len(ids), batch)]
        self.where = {r: (b, i) for b, ids in by_bucket.items() for i, r in enumerate(ids)}
        todo, damaged = (set(self.where), set()) if store is None else self._check(data, seed, store, progress)
        posts, masks = {b: [] for b in by_bucket}, {b: [] for b in by_bucket}
        # A batch with a row to encode is encoded whole, as without a store: the VAE's last bits depend on the
        # batch, so the entries are the latents a RAM-cached run of these rows and batch size computes.
        for b, ids in tqdm([(b, ids) for b, ids in runs if todo.intersection(ids)], desc="caching latents",
                           disable=not progress):
            interrupt.check()  # a stop the signal handler could not raise (one that landed in a __del__)
            px, m = zip(*[data.load_row(r, seed, epoch=0) for r in ids])
            post = vae.encode(torch.stack(px).to(device, dtype)).latent_dist.parameters.float().cpu()
            if store is None:
                posts[b].append(post)
                masks[b] += m
                continue
            channels_last = not post.is_contiguous() and post.is_contiguous(memory_format=torch.channels_last)
            for i, r in enumerate(ids):
                if r in todo:  # the batch's other rows have sound entries: kept as they are
                    mask = None if m[i] is None else latent_mask(m[i][None], post.shape[-2:])[0]
                    store.write(self.keys[r], post[i], mask, channels_last, replace=r in damaged)
        self.encoded = len(todo)
        if store is not None:
            self.store, self.reused = store, len(self.where) - len(todo)
            self.masked = {data.buckets[r] for r in self.where if data.rows[r].mask is not None}
            return
        self.latents = {b: torch.cat(p) for b, p in posts.items()}
        for b, m in masks.items():
            if any(x is not None for x in m):
                ones = torch.ones_like(next(x for x in m if x is not None))
                self.masks[b] = latent_mask(torch.stack([x if x is not None else ones for x in m]),
                                            self.latents[b].shape[-2:])

    def _check(self, data: TrainSet, seed: int, store: LatentStore, progress: bool) -> tuple[set, set]:
        """Each row's key, and (rows to encode, those of them whose entry is damaged)."""
        from tqdm.auto import tqdm

        todo, damaged = set(), {}
        for r in tqdm(sorted(self.where), desc="checking the latent cache", disable=not progress):
            self.keys[r] = store.key(data, r, seed)
            try:
                store.read(self.keys[r])
            except FileNotFoundError:
                todo.add(r)
            except ValueError as e:
                todo.add(r)
                damaged[r] = e
        for r, e in damaged.items():  # after the progress bar, each on a line of its own
            log.warning("latent cache: %s (%s) is damaged (%s); encoding it again", store.path(self.keys[r]),
                        data.rows[r].name, e)
        return todo, set(damaged)

    def __len__(self):
        return len(self.where)

    def latent_batch(self, row_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latent distributions of rows of one bucket, and their masks (None when none has one)."""
        bucket = self.where[row_ids[0]][0]
        if self.store is not None:
            return self._read(row_ids, bucket)
        idx = torch.tensor([self.where[r][1] for r in row_ids])
        mask = self.masks.get(bucket)
        return self.latents[bucket][idx], None if mask is None else mask[idx]

    def _read(self, row_ids: list[int], bucket: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What latent_batch gives from RAM, bit for bit and in the same memory layout, read from the entries."""
        entries = []
        for r in row_ids:
            try:
                entries.append(self.store.read(self.keys[r]))
            except (OSError, ValueError) as e:
                raise UserError(f"latent cache: {self.store.path(self.keys[r])} was removed or damaged during "
                                f"training ({e}); resume with --resume_from_checkpoint latest to encode it "
                                f"again") from None
        post = torch.stack([p for p, _, _ in entries])
        if entries[0][2]:
            post = post.contiguous(memory_format=torch.channels_last)
        if bucket not in self.masked:
            return post, None
        return post, torch.stack([torch.ones(1, *post.shape[-2:]) if m is None else m for _, m, _ in entries])

    @torch.no_grad()
    def build_embeds(self, captions: list[str], encode, batch: int = 32):
        """Each distinct caption's conditioning, `encode(texts) -> conditioning.Text`, kept on the CPU."""
        unique = sorted(set(captions))
        self.caption_ids = {c: i for i, c in enumerate(unique)}
        self.embeds = Text.cat([encode(unique[s:s + batch]).to("cpu") for s in range(0, len(unique), batch)])

    def embeddings(self, captions: list[str]) -> Text:
        return self.embeds[[self.caption_ids[c] for c in captions]]
