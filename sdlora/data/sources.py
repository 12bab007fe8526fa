"""Where training rows come from: a list of `Row(image, caption)` from any of

  * an imagefolder (images + metadata.jsonl / metadata.csv, Hugging Face layout),
  * a folder of images with same-name .txt captions (kohya layout; `N_name` sub-folders repeat N times),
  * a `datasets` id or saved dataset path (--dataset_name),
  * a folder of images with one fixed prompt (DreamBooth instance and class images).

Only what a folder holds is read; every file that can't be used is skipped and named once, and
every malformed caption or metadata file is one line naming the file and line.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from ..errors import UserError
from .images import IMAGE_EXTS, check_image

log = logging.getLogger(__name__)

# Files that belong to a dataset folder without being images; skipped silently.
SIDE_FILES = {".txt", ".caption", ".jsonl", ".json", ".csv", ".md", ".npz"}
# kohya's repeat folders: the images under `10_sks dog` count 10 times per epoch.
REPEAT_FOLDER = re.compile(r"^(-?[0-9]+)_(.+)$")  # a negative N is matched to be refused
# Text encoders read 77 (CLIP) to 512 (T5) tokens. A caption of 64 KiB is no caption but a wrong file (a log, a
# dump, a --caption_extension that matches something else), and tokenizing megabytes of it can take gigabytes:
# refused, not cut, since cutting would train on that wrong file. Characters for texts, bytes for caption files.
MAX_CAPTION = 64 * 1024


@dataclass
class Row:
    image: Path | Callable[[], Image.Image]  # a file, or a loader for a `datasets` row
    caption: str | list[str]
    name: str  # for messages
    size: tuple[int, int] | None = None  # (w, h) when known; None for `datasets` rows
    mask: Path | str | None = None  # --masked_loss: a mask file, "alpha" (the image's own), or None (all of it)
    repeats: int = 1  # examples per epoch (kohya's `N_name` folders)
    repeat_folder: str | None = None  # the `N_name` folder it repeats from, for kohya's ss_dataset_dirs


def dataset_label(source: str) -> str:
    """How the model card and the file header name a data set: a folder by its name only (they are
    published with --push_to_hub; a local path is private and means nothing elsewhere), a Hub id as is."""
    p = Path(source).expanduser()
    return p.resolve().name if p.exists() else str(source)


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


def scan_folder(folder: Path, what: str = "--train_data_dir", caption_extension: str = ".txt") \
        -> tuple[dict[Path, tuple[int, int]], list[tuple[Path, str]]]:
    """Images under `folder` (recursive, sorted) that decode, with their sizes, and the files skipped with reasons
    (side files, and captions with `caption_extension`, are skipped silently)."""
    if not folder.is_dir():
        raise UserError(f"{what} {folder}: not a folder; give a folder of images")
    root, good, skipped = folder.resolve(), {}, []
    # rglob does not descend into symlinked folders (Python 3.10-3.13), so link loops can't make it walk forever.
    for p in sorted(folder.rglob("*")):
        if p.name.startswith(".") or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.suffix.lower() in SIDE_FILES or p.name.lower().endswith(caption_extension.lower()):
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


def caption_suffix(ext: str) -> str:
    """--caption_extension as a suffix: `.caption`, or `caption` given without its dot."""
    ext = ext if ext.startswith(".") else "." + ext
    if len(ext) < 2 or "/" in ext or "\\" in ext or ext.lower() in IMAGE_EXTS:
        raise UserError(f"--caption_extension {ext!r}: not a caption file extension; give one such as .txt or .caption")
    return ext


def repeat_folders(images, folder: Path, what: str) -> dict[Path, tuple[int, str | None, str | None]]:
    """Each image's (repeats, folder caption, folder): (N, name, "N_name") under a first-level `N_name` folder of
    `folder` (kohya's convention), else (1, None, None). Logs each repeat folder once."""
    out, counts = {}, {}
    for p in images:
        parts = p.relative_to(folder).parts
        m = REPEAT_FOLDER.match(parts[0]) if len(parts) > 1 else None
        if m is None:
            out[p] = (1, None, None)
            continue
        if int(m[1]) <= 0:
            raise UserError(f"{what} {folder / parts[0]}: a {m[1]}_ folder's images would never be trained; rename "
                            f"it 1_{m[2]}, or move it out of {what}")
        out[p] = (int(m[1]), m[2].strip(), parts[0])
        counts[parts[0]] = counts.get(parts[0], 0) + 1
    for name, n in counts.items():
        times = int(name.split("_")[0])
        # A dated folder (2019_holiday) reads as 2019 repeats, as in kohya: say so loudly.
        (log.warning if times >= 100 else log.info)(
            "%s: %d image%s, each %d times per epoch (kohya's N_name repeat folder%s)", folder / name, n,
            "s" * (n != 1), times, "; rename it if it is not meant as one" if times >= 100 else "")
    return out


def long_caption(n: int, unit: str = "characters") -> str | None:
    """Why a caption `n` characters (or bytes) long is refused, or None when it is not too long."""
    if n <= MAX_CAPTION:
        return None
    return f"{n:,} {unit}, too long for a caption (over {MAX_CAPTION // 1024} KiB; text encoders read 77-512 tokens)"


def check_caption(cap, where: str) -> None:
    """A caption (text or list of texts) no longer than MAX_CAPTION, else a UserError starting with `where`."""
    for text in cap if isinstance(cap, list) else [cap]:
        why = long_caption(len(text)) if isinstance(text, str) else None
        if why:
            raise UserError(f"{where}: {why}; shorten it")


def read_text(path: Path, root: Path, what: str, limit: int | None = None) -> str:
    """A caption or metadata file's text (a UTF-8 BOM is fine), or a one-line UserError saying why not.
    With `limit`, a file over `limit` bytes is refused before it is read into memory."""
    why = link_problem(path, root, what)
    if why is None and not path.is_file():
        why = "a folder, not a text file" if path.is_dir() else "not a regular file"
    if why:
        raise UserError(f"{path}: {why}")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # read one byte past the limit: a file that grows, or reports no size (/proc), is caught too
            data = f.read() if limit is None else f.read(limit + 1) if size <= limit else b""
    except OSError as e:
        raise UserError(f"{path}: can't read it ({e.strerror}); check its permissions") from None
    if limit is not None and (size > limit or len(data) > limit):
        raise UserError(f"{path}: {long_caption(max(size, len(data)), 'bytes')}; is it the right file?")
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
    text, rows = read_text(path, root, what), []
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
                     what: str = "--train_data_dir", caption_extension: str = ".txt") -> list[Row]:
    """Rows from an imagefolder (metadata.jsonl/.csv) or a kohya folder (same-name .txt captions, or
    `caption_extension`; in an `N_name` folder an image without one is captioned `name`)."""
    ext = caption_suffix(caption_extension)
    good, skipped = scan_folder(folder, what, ext)
    repeats = repeat_folders(good, folder, what)
    root = folder.resolve()
    real = {p: Path(os.path.realpath(p)) for p in good}
    metas = [folder / m for m in ("metadata.jsonl", "metadata.csv")
             if (folder / m).exists() or (folder / m).is_symlink()]
    if len(metas) > 1:  # as `datasets`' imagefolder: using one would silently drop the other's captions
        raise UserError(f"{folder}: both metadata.jsonl and metadata.csv are there; keep one (move or rename the "
                        f"other) so each image has one caption source")
    meta = metas[0] if metas else None
    captions: dict[Path, str | list[str]] = {}
    first_line: dict[Path, int] = {}
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
            check_caption(cap, f"{meta}, line {n}")
            target = Path(os.path.realpath(meta.parent / fn))
            if target in first_line and target in known:
                # A second row would train the image twice per epoch (or, with another caption, means "either of
                # these"): say how to write what was meant instead of guessing. Rows that train nothing are named
                # as skipped below, each time.
                lists = f" (several captions go in a list: \"{caption_column}\": [\"…\", \"…\"])" \
                    if meta.suffix == ".jsonl" else ""
                raise UserError(f"{meta}, line {n}: {fn!r} already has a row (line {first_line[target]}); keep one "
                                f"row per image{lists}")
            first_line[target] = n
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
        txt = p.with_name(p.stem + ext)
        if cap is None:
            cap = read_text(txt, root, what, MAX_CAPTION).strip() if txt.exists() or txt.is_symlink() else None
        n, folder_caption, repeat_folder = repeats[p]
        if cap is None:
            cap = folder_caption  # kohya's DreamBooth-style folders: the name is the caption
        if cap is None or cap == "" or cap == []:
            if not allow_empty_captions:
                where = f"{meta.name} has no row for it" if meta and cap is None else "its caption is empty" \
                    if cap is not None else f"no {txt.name} and no metadata.jsonl"
                raise UserError(f"{p}: no caption ({where}); add one or pass --allow_empty_captions")
            cap = ""
        rows.append(Row(p, cap, str(p), good[p], repeats=n, repeat_folder=repeat_folder))
    return rows


def rows_from_images(folder: Path, prompt: str, what: str, kohya_repeats: bool = True) -> list[Row]:
    """Every readable image in `folder` with one fixed prompt (DreamBooth instance/class sets); images under an
    `N_name` folder repeat N times unless `kohya_repeats` is off."""
    good, _ = scan_folder(folder, what)
    repeats = repeat_folders(good, folder, what) if kohya_repeats else {p: (1, None, None) for p in good}
    return [Row(p, prompt, str(p), size, repeats=repeats[p][0], repeat_folder=repeats[p][2])
            for p, size in good.items()]


def split_heldout(rows: list[Row], fraction: float | None) -> tuple[list[Row], list[Row]]:
    """(training rows, held-out rows): `fraction` of the rows, at least one, chosen by a hash of their names,
    so the same folder always holds out the same images whatever the seed, and resumes agree."""
    if not fraction:
        return rows, []
    n = max(1, round(fraction * len(rows)))
    if n >= len(rows):
        raise UserError(f"--validation_split {fraction}: holding out {n} of {len(rows)} images leaves none to train "
                        f"on; lower it or add images")
    held = set(sorted(range(len(rows)), key=lambda i: hashlib.sha256(Path(rows[i].name).name.encode()).hexdigest())[:n])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


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
        check_caption(cap, f"--dataset_name {name}: row {i}")
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
