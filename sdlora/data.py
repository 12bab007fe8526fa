"""Training data: find image–caption rows, read images robustly, and feed them in a seeded order.

Three sources give the same thing — a list of `Row(image, caption)`:
  * an imagefolder (images + metadata.jsonl / metadata.csv, Hugging Face layout),
  * a folder of images with same-name .txt captions (kohya layout),
  * a `datasets` id or saved dataset path (--dataset_name).
Every random choice (order, crop, flip) is a pure function of (seed, epoch, row), which is
what makes resume exact and lets deterministic rows be VAE-encoded once.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Files that belong to a dataset folder without being images; skipped silently.
SIDE_FILES = {".txt", ".caption", ".jsonl", ".json", ".csv", ".md", ".npz"}


@dataclass
class Row:
    image: Path | Callable[[], Image.Image]  # a file, or a loader for a `datasets` row
    caption: str | list[str]
    name: str  # for messages
    size: tuple[int, int] | None = None  # (w, h) when known; None for `datasets` rows


# ---------------------------------------------------------------- images

def read_image(source) -> Image.Image:
    """Open an image as RGB: EXIF orientation applied, any mode (L, LA, P, RGBA, CMYK, I;16, F) converted."""
    img = source() if callable(source) else Image.open(source)
    img.load()  # decode now, so truncated files fail here and not mid-training
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float greyscale: rescale to 8 bits instead of clipping to white.
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency on white, the usual expectation for cut-out subjects.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


def check_image(path: Path) -> tuple[int, int] | str:
    """The (w, h) of `path` after EXIF rotation if it decodes as an image, else why it can't be used."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            img.load()
            w, h = img.size
            if w < 1 or h < 1:
                return "zero-size image"
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated 90°: width and height swap
                w, h = h, w
            return w, h
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # non-images, truncation
        msg = str(e).split("\n")[0]
        return "not an image" if "cannot identify" in msg else f"unreadable image ({msg})"


def scan_folder(folder: Path, what: str = "--train_data_dir") -> tuple[dict[Path, tuple[int, int]], list[tuple[Path, str]]]:
    """Images under `folder` (recursive, sorted) that decode, with their sizes, and the files skipped with reasons."""
    if not folder.is_dir():
        raise UserError(f"{what} {folder}: not a folder; give a folder of images")
    good, skipped = {}, []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.suffix.lower() in SIDE_FILES:
            continue
        res = check_image(p)
        if isinstance(res, tuple):
            good[p] = res
        else:
            skipped.append((p, res))
    for p, reason in skipped:
        log.warning("skipping %s: %s", p, reason)
    if not good:
        raise UserError(f"{what} {folder}: no readable image found (PNG/JPEG/WebP…); add images to it")
    return good, skipped


# ---------------------------------------------------------------- sources

def _read_metadata(path: Path) -> list[dict]:
    rows = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: malformed JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}, line {n}: expected a JSON object like {{\"file_name\": ..., \"text\": ...}}")
            rows.append(obj)
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    return rows


def rows_from_folder(folder: Path, caption_column: str = "text", allow_empty_captions: bool = False,
                     what: str = "--train_data_dir") -> list[Row]:
    """Rows from an imagefolder (metadata.jsonl/.csv) or a kohya folder (same-name .txt captions)."""
    good, _ = scan_folder(folder, what)
    meta = next((folder / m for m in ("metadata.jsonl", "metadata.csv") if (folder / m).exists()), None)
    captions: dict[Path, str] = {}
    if meta is not None:
        records = _read_metadata(meta)
        columns = sorted({k for r in records for k in r})
        if records and "file_name" not in columns:
            raise UserError(f"{meta}: no 'file_name' column (found: {', '.join(columns)})")
        if records and caption_column not in columns:
            raise UserError(f"{meta}: caption column '{caption_column}' not found (found: {', '.join(columns)}); "
                            f"pass --caption_column NAME")
        for r in records:
            cap = r.get(caption_column)
            captions[(meta.parent / r["file_name"]).resolve()] = "" if cap is None else cap
    rows = []
    for p in good:
        cap = captions.get(p.resolve())
        if cap is None:
            txt = p.with_suffix(".txt")
            cap = txt.read_text(encoding="utf-8").strip() if txt.exists() else None
        if cap is None or cap == "" or cap == []:
            if not allow_empty_captions:
                where = f"{meta.name} has no row for it" if meta and cap is None else "its caption is empty" \
                    if cap is not None else f"no {p.with_suffix('.txt').name} and no metadata.jsonl"
                raise UserError(f"{p}: no caption ({where}); add one or pass --allow_empty_captions")
            cap = ""
        rows.append(Row(p, cap, str(p), good[p]))
    return rows


def rows_from_images(folder: Path, prompt: str, what: str) -> list[Row]:
    """Every readable image in `folder` with one fixed prompt (DreamBooth instance/class sets)."""
    good, _ = scan_folder(folder, what)
    return [Row(p, prompt, str(p), size) for p, size in good.items()]


def rows_from_datasets(name: str, config: str | None, image_column: str | None, caption_column: str | None,
                       cache_dir: str | None, allow_empty_captions: bool = False) -> list[Row]:
    """Rows from a `datasets` id or a local dataset saved/loadable by `datasets`."""
    try:
        import datasets
    except ImportError:
        raise UserError("--dataset_name needs the 'datasets' package: pip install datasets") from None
    try:
        p = Path(name)
        if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "dataset_info.json").exists()):
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, config, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown id, bad files: one line
        raise UserError(f"--dataset_name {name}: could not load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"--dataset_name {name}: no 'train' split (found: {', '.join(ds)})")
        ds = ds["train"]
    cols = ds.column_names
    image_column = image_column or cols[0]
    caption_column = caption_column or (cols[1] if len(cols) > 1 else None)
    for flag, col in (("--image_column", image_column), ("--caption_column", caption_column)):
        if col not in cols:
            raise UserError(f"--dataset_name {name}: {flag} '{col}' not found (found: {', '.join(cols)})")
    rows = []
    for i, cap in enumerate(ds[caption_column]):
        if (cap is None or cap == "") and not allow_empty_captions:
            raise UserError(f"--dataset_name {name}: row {i} has no caption; pass --allow_empty_captions to allow")
        if not isinstance(cap, (str, list)):
            raise UserError(f"--caption_column '{caption_column}' should contain strings or lists of strings")
        rows.append(Row(_DatasetImage(ds, image_column, i), cap or "", f"{name}[{i}]"))
    return rows


class _DatasetImage:
    """Picklable lazy loader for one `datasets` row's image (DataLoader workers need picklable rows)."""

    def __init__(self, ds, column, index):
        self.ds, self.column, self.index = ds, column, index

    def __call__(self):
        img = self.ds[self.index][self.column]
        if isinstance(img, dict) and img.get("path"):
            img = Image.open(img["path"])
        return img


# ---------------------------------------------------------------- transforms

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


# ---------------------------------------------------------------- the dataset the loop sees

class TrainSet(torch.utils.data.Dataset):
    """Examples for the training loop.

    Example i is a list of row ids: one for text-to-image, an instance row plus a class row
    for DreamBooth with prior preservation. Rows carry a loss group (0 = main, 1 = prior).
    Indexed by (epoch, i) so every random choice is reproducible.
    """

    def __init__(self, rows: list[Row], examples: list[list[int]], groups: list[int], resolution: int,
                 center_crop: bool, random_flip: bool, seed: int):
        self.rows, self.examples, self.groups = rows, examples, groups
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.cached_latents = False  # set by the loop once pixels are no longer needed

    def __len__(self):
        return len(self.examples)

    def load_row(self, row_id: int, epoch: int, where: tuple[int, ...] = ()) -> torch.Tensor:
        """Pixels of a row; `where` (example, slot) gives each repeat of a row its own crop/flip."""
        rng = rng_for(self.seed, 1, epoch, row_id, *where)
        return preprocess(read_image(self.rows[row_id].image), self.resolution, self.center_crop, self.random_flip, rng)

    def caption(self, row_id: int, epoch: int, where: tuple[int, ...] = ()) -> str:
        return pick_caption(self.rows[row_id].caption, rng_for(self.seed, 2, epoch, row_id, *where))

    def __getitem__(self, key):
        epoch, i = key
        ids = self.examples[i]
        out = {"row_ids": ids, "groups": [self.groups[r] for r in ids],
               "captions": [self.caption(r, epoch, (i, k)) for k, r in enumerate(ids)]}
        if not self.cached_latents:
            out["pixel_values"] = [self.load_row(r, epoch, (i, k)) for k, r in enumerate(ids)]
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
