"""Which images of a folder get a caption, and why the others don't: read before any model loads.

The files are vetted as the trainer's data readers vet them (sdlora/data/sources.py): hidden files and side files
are passed over silently; a non-image, an unreadable image or a link out of the folder is skipped with a one-line
reason. An existing caption is never replaced unless asked (`overwrite`), and `append` reads it as the trainer
would (UTF-8, size-checked), so a caption it could not read is skipped, not clobbered.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data.images import check_image
from ..data.sources import MAX_CAPTION, SIDE_FILES, caption_suffix, link_problem, read_text
from ..errors import UserError

log = logging.getLogger(__name__)

MODES = ("skip", "overwrite", "append")  # what to do with an image that has a caption already


@dataclass
class Item:
    image: Path
    caption: Path  # the caption file to write
    existing: str | None = None  # `append`: the caption there now


@dataclass
class Plan:
    folder: Path
    extension: str
    items: list[Item] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)


def _files(folder: Path, recursive: bool):
    """The folder's visible files (and links), sorted; sub-folders' too with `recursive`, else the number of
    sub-folders passed over."""
    found = sorted(folder.rglob("*") if recursive else folder.iterdir())
    visible = [p for p in found if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    subfolders = 0 if recursive else sum(p.is_dir() and not p.is_symlink() for p in visible)
    return [p for p in visible if p.is_symlink() or not p.is_dir()], subfolders


def _existing(item: Item, mode: str, root: Path) -> str | None:
    """Why an image with a caption file already is skipped in `mode` (None: it is captioned; `append` reads the
    caption into the item)."""
    cap = item.caption
    if mode == "skip":
        return f"{cap.name} exists (--overwrite replaces it, --append adds to it)"
    if cap.is_symlink() or not cap.is_file():
        return f"{cap.name} is a link or not a regular file; sdlora writes no caption through it"
    if mode == "append":
        try:
            item.existing = read_text(cap, root, "the folder", MAX_CAPTION).strip()
        except UserError as e:
            return f"its caption can't be added to: {e}"
    return None


def plan(folder, extension: str = ".txt", mode: str = "skip", recursive: bool = False) -> Plan:
    """What `caption_folder` will do with each image under `folder` (its sub-folders too with `recursive`, e.g.
    kohya's `10_name` repeat folders); skipped files are logged once each, as the data readers do."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; give a folder of images")
    ext = caption_suffix(extension)
    root = folder.resolve()
    out, claimed = Plan(folder, ext), {}
    files, subfolders = _files(folder, recursive)
    for p in files:
        if p.suffix.lower() in SIDE_FILES or p.name.lower().endswith(ext.lower()):
            continue  # captions and metadata
        why = link_problem(p, root, "the folder")
        size = why or check_image(p)
        if isinstance(size, str):
            out.skipped.append((p, size))
            continue
        item = Item(p, p.with_name(p.stem + ext))
        if item.caption in claimed:
            why = f"{claimed[item.caption].name} has the same name and so the same caption file {item.caption.name}"
        elif item.caption.exists() or item.caption.is_symlink():
            why = _existing(item, mode, root)
        claimed[item.caption] = p
        if why:
            out.skipped.append((p, why))
        else:
            out.items.append(item)
    for p, why in out.skipped:
        if "exists (" not in why:  # a kept caption is the default, said once in the summary; a problem is said here
            log.warning("skipping %s: %s", p, why)
    for meta in (folder / "metadata.jsonl", folder / "metadata.csv"):
        if meta.exists():
            log.warning("%s: the trainer reads the captions of the images it lists from it, not from %s files",
                        meta, ext)
    if not out.items and not out.skipped:
        hint = f"; its {subfolders} sub-folder(s) are read with --recursive" if subfolders else ""
        raise UserError(f"{folder}: no image in it (PNG/JPEG/WebP…){hint}")
    return out


def leftovers(plan_: Plan) -> list[Path]:
    """Temp files that an earlier, killed run left beside the folder's captions (sdlora/io.py names them
    `.<caption name>.<16 hex>.sdlora-tmp`): removed before the run starts, so a rerun leaves the folder clean."""
    from ..io import TMP_NAME

    found = []
    for parent in sorted({p.parent for p, _ in plan_.skipped} | {item.image.parent for item in plan_.items}):
        with os.scandir(parent) as entries:
            # ".a.txt.0123456789abcdef.sdlora-tmp" -> "a.txt"
            found += [Path(e.path) for e in entries
                      if TMP_NAME.fullmatch(e.name) and e.name[1:].rsplit(".", 2)[0].endswith(plan_.extension)]
    return sorted(found)
