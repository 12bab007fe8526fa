"""The dataset the training loop sees: rows grouped into examples, seeded augmentation, and the stream of
batches.

Every random choice (order, crop, flip, caption pick) is a pure function of (seed, epoch, row, slot),
which is what makes resume exact and lets deterministic rows be VAE-encoded once.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .captions import CaptionOps
from .images import read_image
from .sources import Row


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, *keys])


def has_random_transform(rows: list[Row], random_flip: bool, center_crop: bool) -> bool:
    """True when a row's pixels differ between epochs (so its latents can't be cached).

    A random crop of a square image resized to the resolution has nothing to choose from,
    so square data sets cache even without --center_crop.
    """
    if random_flip:
        return True
    return not center_crop and any(r.size is None or r.size[0] != r.size[1] for r in rows)


def preprocess(img: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
               rng: np.random.Generator) -> torch.Tensor:
    """Resize the short side to `resolution`, crop to a square, maybe flip; return CHW in [-1, 1]."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    if center_crop:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = int(rng.integers(0, nw - resolution + 1)), int(rng.integers(0, nh - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return a / 127.5 - 1.0


def pick_caption(caption: str | list[str], rng: np.random.Generator) -> str:
    """A list of captions means 'any of these' (diffusers' convention): pick one per epoch."""
    if isinstance(caption, list):
        return caption[int(rng.integers(0, len(caption)))] if caption else ""
    return caption


class TrainSet:
    """What a recipe hands the loop: rows, how they form examples, and how they are cropped.

    Example i is a list of row ids: one for text-to-image, an instance row plus a class row
    for DreamBooth with prior preservation. Rows carry a loss group (0 = main, 1 = prior).
    Every pixel and caption is drawn for a given (seed, epoch, example, slot), so the run's
    seed is an argument, not state.
    """

    def __init__(self, rows: list[Row], examples: list[list[int]], groups: list[int], resolution: int,
                 center_crop: bool, random_flip: bool, captions: CaptionOps | None = None):
        self.rows, self.examples, self.groups = rows, examples, groups
        self.caption_ops = captions  # main-group rows only: DreamBooth's class prompts stay as they are
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __len__(self):
        return len(self.examples)

    def load_row(self, row_id: int, seed: int, epoch: int, where: tuple[int, ...] = ()) -> torch.Tensor:
        """Pixels of a row; `where` (example, slot) gives each repeat of a row its own crop/flip."""
        rng = rng_for(seed, 1, epoch, row_id, *where)
        return preprocess(read_image(self.rows[row_id].image), self.resolution, self.center_crop, self.random_flip, rng)

    def caption(self, row_id: int, seed: int, epoch: int, where: tuple[int, ...] = ()) -> str:
        rng = rng_for(seed, 2, epoch, row_id, *where)
        text = pick_caption(self.rows[row_id].caption, rng)
        if self.caption_ops is None or self.groups[row_id] != 0:
            return text
        return self.caption_ops.apply(text, rng)  # same generator: still a pure function of (seed, epoch, slot)

    def deterministic(self) -> bool:
        """True when no row's pixels change between epochs, so its latents can be cached."""
        return not has_random_transform(self.rows, self.random_flip, self.center_crop)

    def digest(self) -> str:
        """A fingerprint of what is trained on: each image's file name and size, its caption, and how rows
        form examples and loss groups. Moving the folder keeps it; changing an image or caption does not."""
        rows = []
        for r in self.rows:
            size = r.image.stat().st_size if isinstance(r.image, Path) else None
            rows.append([Path(r.name).name if size is not None else r.name, size, r.caption])
        blob = json.dumps([rows, self.examples, self.groups], sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


class Examples(torch.utils.data.Dataset):
    """A TrainSet under one run's seed, indexed by (epoch, example): captions picked, and pixels loaded
    unless the loop serves cached latents instead."""

    def __init__(self, data: TrainSet, seed: int, pixels: bool):
        self.data, self.seed, self.pixels = data, seed, pixels

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        epoch, i = key
        ids = self.data.examples[i]
        out = {"row_ids": ids, "groups": [self.data.groups[r] for r in ids],
               "captions": [self.data.caption(r, self.seed, epoch, (i, k)) for k, r in enumerate(ids)]}
        if self.pixels:
            out["pixel_values"] = [self.data.load_row(r, self.seed, epoch, (i, k)) for k, r in enumerate(ids)]
        return out


def collate(items: list[dict]) -> dict:
    """Flatten examples to rows, main-group rows first (DreamBooth's instance|class halves)."""
    flat = [(r, g, c, p) for it in items
            for r, g, c, p in zip(it["row_ids"], it["groups"], it["captions"], it.get("pixel_values") or [None] * len(it["row_ids"]))]
    flat.sort(key=lambda t: t[1])  # stable: keeps order within a group
    batch = {"row_ids": torch.tensor([t[0] for t in flat]), "groups": torch.tensor([t[1] for t in flat]),
             "captions": [t[2] for t in flat]}
    if flat[0][3] is not None:
        batch["pixel_values"] = torch.stack([t[3] for t in flat])
    return batch


class StreamSampler(torch.utils.data.Sampler):
    """An endless, seeded stream of batches of (epoch, index) keys, sharded across processes.

    Micro-batch m of process r is a pure function of (seed, m, r): resuming at micro-batch m
    replays exactly what an uninterrupted run would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.n, self.bs, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n // (self.bs * self.world))

    def batch(self, m: int) -> list[tuple[int, int]]:
        epoch, k = divmod(m, self.batches_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        need = self.batches_per_epoch * self.bs * self.world
        perm = (perm * (need // self.n + 1))[:need]  # wrap so every process gets full batches
        s = (k * self.world + self.rank) * self.bs
        return [(epoch, i) for i in perm[s:s + self.bs]]

    def __iter__(self):
        m = self.start
        while True:
            yield self.batch(m)
            m += 1

    def __len__(self):  # endless; DataLoader only needs this for len(), which we never call
        return 2**62
