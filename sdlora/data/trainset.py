"""The dataset the training loop sees: rows grouped into examples, seeded augmentation, and the stream of
batches.

Every random choice (order, crop, flip, caption pick) is a pure function of (seed, epoch, row, slot),
which is what makes resume exact and lets deterministic rows be VAE-encoded once.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from . import buckets
from .buckets import Bucketing
from .images import read_image, read_mask
from .captions import CaptionOps
from .sources import Row

log = logging.getLogger(__name__)


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, *keys])


@dataclass(frozen=True)
class Layout:
    """Where one row's pixels come from: resized to `resized`, cropped at `crop` (left, top) to `bucket`,
    maybe flipped. Computed from the image's size alone, so it is known without decoding the image."""
    size: tuple[int, int]  # the image's (w, h) after EXIF rotation
    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]
    flip: bool

    def geometry(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's micro-conditioning in its order: original (h, w), crop top-left (top, left), target (h, w).
        A flipped image's crop is measured from its new left edge (as kohya's sd-scripts do)."""
        left = self.resized[0] - self.crop[0] - self.bucket[0] if self.flip else self.crop[0]
        return (self.size[1], self.size[0], self.crop[1], left, self.bucket[1], self.bucket[0])


def layout(size: tuple[int, int], bucket: tuple[int, int], center_crop: bool, random_flip: bool,
           rng: np.random.Generator) -> Layout:
    """Resize to cover the bucket, crop the sliver that does not fit (centred or at random), maybe flip."""
    (bw, bh), (nw, nh) = bucket, buckets.cover(size, bucket)
    if center_crop:
        left, top = (nw - bw) // 2, (nh - bh) // 2
    else:
        left, top = int(rng.integers(0, nw - bw + 1)), int(rng.integers(0, nh - bh + 1))
    return Layout(size, bucket, (nw, nh), (left, top), bool(random_flip and rng.random() < 0.5))


# The version of what turns a file and a Layout into pixels and a mask (read_image, read_mask, apply, to_tensor):
# latents cached on disk are keyed by it, so bump it when any of them changes a pixel.
PIXELS_VERSION = 1


def apply(img: Image.Image, lay: Layout, resample=Image.BILINEAR) -> Image.Image:
    (bw, bh), (left, top) = lay.bucket, lay.crop
    img = img.resize(lay.resized, resample).crop((left, top, left + bw, top + bh))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if lay.flip else img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """CHW in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return a / 127.5 - 1.0


def pick_caption(caption: str | list[str], rng: np.random.Generator) -> str:
    """A list of captions means 'any of these' (diffusers' convention): pick one per epoch."""
    if isinstance(caption, list):
        return caption[int(rng.integers(0, len(caption)))] if caption else ""
    return caption


@dataclass(frozen=True)
class Part:
    """A --dataset_config subset: its dataset's sizing (resolution, buckets) and its own flip and caption operations.
    Rows of different datasets never share a batch (TrainSet.key)."""
    name: str  # for the log: the dataset and the subset's folder
    dataset: int
    bucketing: Bucketing
    random_flip: bool = False
    captions: CaptionOps | None = None


class TrainSet:
    """What a recipe hands the loop: rows, how they form examples, and how they are sized and cropped.

    Example i is a list of row ids: one for text-to-image, an instance row plus a class row
    for DreamBooth with prior preservation. Rows carry a loss group (0 = main, 1 = prior).
    Each row trains at its aspect-ratio bucket (`bucketing`; the square --resolution crop when it is
    off). Every pixel and caption is drawn for a given (seed, epoch, example, slot), so the run's
    seed is an argument, not state. With `parts` (a --dataset_config), row i belongs to `parts[row_parts[i]]`,
    whose sizing, flip and caption operations it takes instead of the set's own.
    """

    def __init__(self, rows: list[Row], examples: list[list[int]], groups: list[int], resolution: int,
                 center_crop: bool, random_flip: bool, bucketing: Bucketing | None = None,
                 captions: CaptionOps | None = None, parts: list[Part] | None = None,
                 row_parts: list[int] | None = None):
        self.rows, self.groups = rows, groups
        self.caption_ops = captions  # main-group rows only: DreamBooth's class prompts stay as they are
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.bucketing = bucketing or Bucketing(resolution, enabled=False)
        self.parts, self.row_parts = parts, row_parts
        if parts:
            self.random_flip = any(p.random_flip for p in parts)
        for r in rows:  # also with --no_bucket: a crop's place and SDXL's size conditioning follow from the size
            if r.size is None:  # a `datasets` row: its size is only known by decoding it
                r.size = read_image(r.image).size
        self.buckets = self._assign()
        too_small = {i for i, b in enumerate(self.buckets) if b is None}
        for i in sorted(too_small):
            log.warning("skipping %s: %dx%d is smaller than one --bucket_reso_steps (%d) and --bucket_no_upscale "
                        "keeps it that size", rows[i].name, *rows[i].size, self.bucketing.step)
        self.examples = [e for e in examples if not too_small.intersection(e)]
        if not self.examples:
            raise UserError("no image is left to train on: every one is smaller than one --bucket_reso_steps; "
                            "drop --bucket_no_upscale or use larger images")

    def _assign(self) -> list:
        """Each row's bucket, from its part's table (the set's own without parts)."""
        sizing = [p.bucketing for p in self.parts] if self.parts else [self.bucketing]
        tables = [b.table() for b in sizing]
        out = []
        for i, r in enumerate(self.rows):
            k = self.row_parts[i] if self.parts else 0
            out.append(sizing[k].assign(r.size, tables[k]) if r.size else (sizing[k].resolution,) * 2)
        return out

    def part(self, row_id: int) -> Part | None:
        return self.parts[self.row_parts[row_id]] if self.parts else None

    def ops(self, row_id: int) -> CaptionOps | None:
        """The caption operations of a row (its part's, else the set's)."""
        return self.part(row_id).captions if self.parts else self.caption_ops

    def captions_vary(self) -> bool:
        """Whether some caption's text changes between steps (so text embeddings can't be cached)."""
        return any(o is not None and o.varies for o in ([p.captions for p in self.parts] if self.parts
                                                        else [self.caption_ops]))

    def captions_drop(self) -> bool:
        return any(o is not None and o.dropout_rate > 0 for o in ([p.captions for p in self.parts] if self.parts
                                                                  else [self.caption_ops]))

    def __len__(self):
        return len(self.examples)

    def used_rows(self) -> list[int]:
        """Row ids some example uses (a row skipped for its size is in none)."""
        return sorted({r for e in self.examples for r in e})

    def key(self, i: int) -> tuple:
        """Example i's buckets: examples with the same key can share a micro-batch (of one dataset, with parts)."""
        sizes = tuple(self.buckets[r] for r in self.examples[i])
        return (self.part(self.examples[i][0]).dataset, sizes) if self.parts else sizes

    def layout(self, row_id: int, seed: int, epoch: int, where: tuple[int, ...] = (), size=None) -> Layout:
        """How a row is cropped; `where` (example, slot) gives each repeat of a row its own crop/flip. `size`: the
        decoded image's, for a `datasets` row whose size is not known before (else its bucket stands in)."""
        size = self.rows[row_id].size or size or self.buckets[row_id]
        flip = self.part(row_id).random_flip if self.parts else self.random_flip
        return layout(size, self.buckets[row_id], self.center_crop, flip, rng_for(seed, 1, epoch, row_id, *where))

    def load_row(self, row_id: int, seed: int, epoch: int, where: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixels (CHW in [-1, 1]) of a row, and its loss mask (1HW in [0, 1]) when it has one."""
        row = self.rows[row_id]
        img = read_image(row.image)
        lay = self.layout(row_id, seed, epoch, where, img.size)
        mask = None
        if row.mask is not None:
            alpha = row.mask == "alpha"
            m = apply(read_mask(row.image if alpha else row.mask, alpha), lay)
            mask = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None]
        return to_tensor(apply(img, lay)), mask

    def caption(self, row_id: int, seed: int, epoch: int, where: tuple[int, ...] = ()) -> str:
        rng = rng_for(seed, 2, epoch, row_id, *where)
        text = pick_caption(self.rows[row_id].caption, rng)
        ops = self.ops(row_id)
        if ops is None or (self.groups[row_id] != 0 and not self.parts):  # a subset's own ops: is_reg ones too
            return text
        return ops.apply(text, rng)  # same generator: still a pure function of (seed, epoch, slot)

    def deterministic(self) -> bool:
        """True when no row's pixels change between epochs, so its latents can be cached: no random flip,
        and no random crop with anything to choose from."""
        if self.random_flip:
            return False
        return self.center_crop or all(
            r.size is not None and buckets.cover(r.size, self.buckets[i]) == self.buckets[i]
            for i, r in enumerate(self.rows) if self.buckets[i] is not None)

    def bucket_report(self, dataset: int | None = None) -> tuple[dict, float, float]:
        """(bucket -> images, mean area kept, mean a square centre crop would keep) over the rows used (of one
        `dataset` of the parts)."""
        used = [i for i in self.used_rows() if self.rows[i].size and (dataset is None or
                                                                      self.part(i).dataset == dataset)]
        res = next((p.bucketing.resolution for p in self.parts or () if p.dataset == dataset), self.resolution)
        return buckets.report([self.rows[i].size for i in used], [self.buckets[i] for i in used], res)

    def digest(self) -> str:
        """A fingerprint of what is trained on: each image's file name and size, its caption, and how rows
        form examples and loss groups. Moving the folder keeps it; changing an image or caption does not."""
        rows = []
        for r in self.rows:
            size = r.image.stat().st_size if isinstance(r.image, Path) else None
            rows.append([Path(r.name).name if size is not None else r.name, size, r.caption])
            if r.mask is not None:  # a changed mask changes what is learned
                rows[-1].append(r.mask if r.mask == "alpha" else [r.mask.name, r.mask.stat().st_size])
        parts = [[self.parts, self.row_parts]] if self.parts else []  # every subset's own settings, with parts
        blob = json.dumps([rows, self.examples, self.groups, *parts], sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


def heldout_set(rows: list[Row], resolution: int, bucketing: Bucketing) -> TrainSet | None:
    """Held-out rows as the validation loss sees them: each once, centre-cropped in its bucket, never flipped."""
    return TrainSet(rows, [[i] for i in range(len(rows))], [0] * len(rows), resolution, True, False, bucketing) \
        if rows else None


class Examples(torch.utils.data.Dataset):
    """A TrainSet under one run's seed, indexed by (epoch, example): captions picked, crops placed, and
    pixels (and masks) loaded unless the loop serves cached latents instead."""

    def __init__(self, data: TrainSet, seed: int, pixels: bool):
        self.data, self.seed, self.pixels = data, seed, pixels

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        epoch, i = key
        ids, d = self.data.examples[i], self.data
        out = {"row_ids": ids, "groups": [d.groups[r] for r in ids], "buckets": [d.buckets[r] for r in ids],
               "captions": [d.caption(r, self.seed, epoch, (i, k)) for k, r in enumerate(ids)],
               "geometry": [d.layout(r, self.seed, epoch, (i, k)).geometry() for k, r in enumerate(ids)]}
        if self.pixels:
            out["pixel_values"], out["masks"] = zip(*[d.load_row(r, self.seed, epoch, (i, k)) for k, r in enumerate(ids)])
        return out


def collate(items: list[dict]) -> dict:
    """Flatten examples to rows, main-group rows first (DreamBooth's instance|class halves), in chunks of one
    bucket each: `chunks` are (start, end) runs of rows of the same size, and `pixel_values` / `masks` hold one
    tensor per chunk (a mask chunk is None when none of its rows has a mask)."""
    keys = ("row_ids", "groups", "buckets", "captions", "geometry")
    flat = [dict(zip(keys + ("px", "mask"), t)) for it in items
            for t in zip(*(it[k] for k in keys), it.get("pixel_values") or [None] * len(it["row_ids"]),
                         it.get("masks") or [None] * len(it["row_ids"]))]
    flat.sort(key=lambda r: r["groups"])  # stable: keeps order within a group
    chunks, start = [], 0
    for j in range(1, len(flat) + 1):
        if j == len(flat) or flat[j]["buckets"] != flat[start]["buckets"]:
            chunks.append((start, j))
            start = j
    batch = {"row_ids": torch.tensor([r["row_ids"] for r in flat]), "groups": torch.tensor([r["groups"] for r in flat]),
             "captions": [r["captions"] for r in flat], "geometry": torch.tensor([r["geometry"] for r in flat]),
             "chunks": chunks}
    if flat[0]["px"] is not None:
        batch["pixel_values"] = [torch.stack([r["px"] for r in flat[s:e]]) for s, e in chunks]
        batch["masks"] = [_masks(flat[s:e]) for s, e in chunks]
    return batch


def _masks(rows: list[dict]) -> torch.Tensor | None:
    if all(r["mask"] is None for r in rows):
        return None
    return torch.stack([r["mask"] if r["mask"] is not None else torch.ones_like(r["px"][:1]) for r in rows])


def loader(data: TrainSet, seed: int, sampler: StreamSampler, pixels: bool, workers: int = 0):
    """The stream of batches the loop trains on: `workers` processes decode and augment ahead of the step."""
    return torch.utils.data.DataLoader(Examples(data, seed, pixels), batch_sampler=sampler, collate_fn=collate,
                                       num_workers=workers)


class StreamSampler(torch.utils.data.Sampler):
    """An endless, seeded stream of batches of (epoch, index) keys, sharded across processes.

    Micro-batch m of process r is a pure function of (seed, m, r): resuming at micro-batch m
    replays exactly what an uninterrupted run would have seen. With `keys` (each example's buckets),
    every global batch holds examples of one key: each epoch's shuffled order is split by key, each
    key's list filled up to whole batches from its own start, and the batches taken in the order their
    first example comes in the shuffle. With one key this is the plain shuffled stream.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0,
                 keys: list | None = None):
        self.n, self.bs, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self.keys = keys or [0] * n
        sizes: dict = {}
        for k in self.keys:
            sizes[k] = sizes.get(k, 0) + 1
        self.batches_per_epoch = sum(-(-c // (batch_size * world)) for c in sizes.values())
        self._epoch = (None, None)

    def _global_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            per_key: dict = {}
            for i in perm:
                per_key.setdefault(self.keys[i], []).append(i)
            span, out = self.bs * self.world, []
            for ids in per_key.values():
                need = -(-len(ids) // span) * span
                ids = (ids * (need // len(ids) + 1))[:need]  # wrap so every process gets full batches
                out += [ids[s:s + span] for s in range(0, need, span)]
            pos = {i: p for p, i in enumerate(perm)}
            out.sort(key=lambda b: pos[b[0]])
            self._epoch = (epoch, out)
        return self._epoch[1]

    def batch(self, m: int) -> list[tuple[int, int]]:
        epoch, k = divmod(m, self.batches_per_epoch)
        ids = self._global_batches(epoch)[k]
        return [(epoch, i) for i in ids[self.rank * self.bs:(self.rank + 1) * self.bs]]
    def __iter__(self):
        m = self.start
        while True:
            yield self.batch(m)
            m += 1

    def __len__(self):  # endless; DataLoader only needs this for len(), which we never call
        return 2**62
