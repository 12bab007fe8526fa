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
import errno
import io
import json
import logging
import os
import re
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
    return to_rgb(source() if callable(source) else Image.open(source))


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image decoded and converted as read_image describes."""
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
        if not path.is_file():
            return "not a regular file"  # opening a FIFO or device would block or never end
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            img.load()
            w, h = img.size
            if w < 1 or h < 1:
                return "zero-size image"
            if img.mode != "RGB":
                to_rgb(img)  # the conversion training does, so a mode it can't handle fails here and not mid-run
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated 90°: width and height swap
                w, h = h, w
            return w, h
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt files (OSError, SyntaxError, ...)
        msg = str(e).split("\n")[0] or type(e).__name__
        return "not an image" if "cannot identify" in msg else f"unreadable image ({msg})"


def link_problem(p: Path, root: Path, what: str) -> str | None:
    """Why the symlink `p` can't be used (broken, a loop, or leading out of `root`, a resolved folder), else None."""
    if not p.is_symlink():
        return None
    try:
        real = Path(os.path.realpath(p, strict=True))
    except OSError as e:
        return {errno.ELOOP: "symlink loop", errno.ENOENT: "broken symlink (its target does not exist)"}.get(
            e.errno, f"symlink that can't be followed ({e.strerror})")
    if not real.is_relative_to(root):
        # Only what the folder holds is read: a downloaded data set's links could point anywhere.
        return f"symlink to a {'folder' if real.is_dir() else 'file'} outside {what}; copy it in to use it"
    return None


def scan_folder(folder: Path, what: str = "--train_data_dir") -> tuple[dict[Path, tuple[int, int]], list[tuple[Path, str]]]:
    """Images under `folder` (recursive, sorted) that decode, with their sizes, and the files skipped with reasons."""
    if not folder.is_dir():
        raise UserError(f"{what} {folder}: not a folder; give a folder of images")
    root, good, skipped = folder.resolve(), {}, []
    # rglob does not descend into symlinked folders (Python 3.10-3.13), so link loops can't make it walk forever.
    for p in sorted(folder.rglob("*")):
        if p.name.startswith(".") or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.suffix.lower() in SIDE_FILES:
            continue  # captions and metadata are read (and checked) by rows_from_folder
        res = link_problem(p, root, what)
        if res is None and p.is_dir():
            continue  # its files are listed on their own (a symlinked one's at the place it points to)
        res = res or check_image(p)
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

def _read_text(path: Path, root: Path, what: str) -> str:
    """A caption or metadata file's text (a UTF-8 BOM is fine), or a one-line UserError saying why not."""
    why = link_problem(path, root, what)
    if why is None and not path.is_file():
        why = "a folder, not a text file" if path.is_dir() else "not a regular file"
    if why:
        raise UserError(f"{path}: {why}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: can't read it ({e.strerror}); check its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        utf16 = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise UserError(f"{path}, line {line}: not UTF-8 text{utf16}; save it as UTF-8") from None


def _show(v) -> str:
    """A value, short and on one line, for a message."""
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 40 else s[:39] + "…"


def _is_caption(cap) -> bool:
    """Text, a list of texts (diffusers: 'any of these'), or None (no caption)."""
    return cap is None or isinstance(cap, str) or isinstance(cap, list) and all(isinstance(c, str) for c in cap)


def _read_metadata(path: Path, root: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, row) for each row of metadata.jsonl / metadata.csv."""
    text, rows = _read_text(path, root, what), []
    if path.suffix == ".jsonl":
        # Lines end only at \n, \r\n or \r: str.splitlines would also cut captions at U+2028, U+0085...
        for n, line in enumerate(re.split(r"\r\n|\r|\n", text), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, or a number too long / nesting too deep
                why = e.msg if isinstance(e, json.JSONDecodeError) else "a number too long or nesting too deep"
                raise UserError(f"{path}, line {n}: malformed JSON ({why}); fix or remove that line") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}, line {n}: expected a JSON object like {{\"file_name\": ..., \"text\": ...}}")
            rows.append((n, obj))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for r in reader:
                if any(r.pop(None, ())):  # more fields than the header has: usually a caption with an unquoted comma
                    raise UserError(f"{path}, line {reader.line_num}: more fields than the header's "
                                    f"{len(reader.fieldnames)}; put text that contains commas in double quotes")
                if any(r.values()):  # a row of empty fields (",,") is a blank line
                    rows.append((reader.line_num, r))
        except csv.Error as e:  # line_num counts the lines of the rows read before the bad one
            raise UserError(f"{path}, line {reader.line_num + 1}: malformed CSV ({e}); fix that line") from None
    return rows


def rows_from_folder(folder: Path, caption_column: str = "text", allow_empty_captions: bool = False,
                     what: str = "--train_data_dir") -> list[Row]:
    """Rows from an imagefolder (metadata.jsonl/.csv) or a kohya folder (same-name .txt captions)."""
    good, skipped = scan_folder(folder, what)
    root = folder.resolve()
    real = {p: Path(os.path.realpath(p)) for p in good}
    meta = next((folder / m for m in ("metadata.jsonl", "metadata.csv")
                 if (folder / m).exists() or (folder / m).is_symlink()), None)
    captions: dict[Path, str | list[str]] = {}
    if meta is not None:
        records = _read_metadata(meta, root, what)
        columns = sorted({k for _, r in records for k in r})
        if records and "file_name" not in columns:
            raise UserError(f"{meta}: no 'file_name' column (found: {', '.join(columns)})")
        if records and caption_column not in columns:
            raise UserError(f"{meta}: caption column '{caption_column}' not found (found: {', '.join(columns)}); "
                            f"pass --caption_column NAME")
        known = set(real.values())
        named = {Path(os.path.realpath(p)) for p, _ in skipped}  # scan_folder has said why already
        for n, r in records:
            fn, cap = r.get("file_name"), r.get(caption_column)
            if not isinstance(fn, str) or not fn.strip() or "\0" in fn:
                raise UserError(f"{meta}, line {n}: 'file_name' should be the image's path in quotes, like "
                                f"\"img.png\" (got {'nothing' if fn is None else _show(fn)})")
            if not _is_caption(cap):
                raise UserError(f"{meta}, line {n}: caption '{caption_column}' should be text or a list of texts "
                                f"(got {_show(cap)}); put it in quotes")
            target = Path(os.path.realpath(meta.parent / fn))
            if target in known:
                captions[target] = "" if cap is None else cap
            elif target not in named:  # nothing is read here: only images scan_folder found get captions
                if not target.is_relative_to(root):
                    why = f"{fn!r} is outside {what}"
                elif not os.path.exists(target):
                    why = f"no file {fn!r}" + (" (use / between folders)" if "\\" in fn else "")
                else:
                    why = f"{fn!r} is not an image (folders, hidden and .txt/.json side files are not read)"
                log.warning("skipping %s, line %d: %s", meta, n, why)
    rows = []
    for p in good:
        cap = captions.get(real[p])
        if cap is None:
            txt = p.with_suffix(".txt")
            cap = _read_text(txt, root, what).strip() if txt.exists() or txt.is_symlink() else None
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
        if not _is_caption(cap):
            raise UserError(f"--dataset_name {name}: row {i}: --caption_column '{caption_column}' holds {_show(cap)}; "
                            f"it should hold text or lists of texts")
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
