"""Loss masks (--masked_loss): which part of each image is learned, so a subject's background is not.

A row's mask is its image's own alpha channel, or the same-name image in --mask_dir (white = learn,
black = ignore, grey in between). Rows with neither are learned whole, and the log says how many.
"""
from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from ..errors import UserError
from .images import IMAGE_EXTS, check_image, has_alpha, transparent
from .sources import Row

log = logging.getLogger(__name__)


def attach(rows: list[Row], mask_dir: Path | None, roots: list = ()) -> None:
    """Set each row's `mask`; a mask that can't be used is a one-line error naming it, before any model loads.

    A mask is found at the image's path relative to its folder in `roots` (training, held-out) inside `mask_dir`, any image
    extension (5_dog/a.jpg -> mask_dir/5_dog/a.png), else by file name alone when that is unambiguous."""
    if any(not isinstance(r.image, Path) for r in rows):
        raise UserError("--masked_loss needs image files (--train_data_dir / --instance_data_dir); "
                        "it can't read masks for --dataset_name rows")
    by_path, by_name = _index(mask_dir) if mask_dir else ({}, {})
    stems: dict[str, int] = {}
    for r in rows:
        stems[r.image.stem] = stems.get(r.image.stem, 0) + 1
    whole = 0
    for r in rows:
        rel = _relative(r.image, roots)
        found = by_path.get(rel.with_suffix("").as_posix()) if rel else None
        if found is None and by_name.get(r.image.stem):
            if len(by_name[r.image.stem]) > 1 or stems[r.image.stem] > 1:
                raise UserError(f"--mask_dir {mask_dir}: '{r.image.stem}' names more than one image or mask "
                                f"({r.image}); put each mask at its image's path inside --mask_dir, e.g. "
                                f"{mask_dir / (rel or Path(r.image.name)).with_suffix('.png')}")
            found = by_name[r.image.stem][0]
        if found is not None:
            size = check_image(found)
            if isinstance(size, str):
                raise UserError(f"{found}: {size}; replace the mask of {r.image.name}")
            if size != r.size:
                raise UserError(f"{found}: mask is {size[0]}x{size[1]} but its image {r.image} is {r.size[0]}x{r.size[1]}; "
                                f"save the mask at the image's size")
            r.mask = found
        elif _transparent(r.image):
            r.mask = "alpha"
        else:
            whole += 1
    if whole == len(rows):
        where = f"no file in --mask_dir {mask_dir} is named like an image" if mask_dir else \
            "no image has transparency (an alpha channel that is not fully opaque)"
        raise UserError(f"--masked_loss: {where}; give masks (white = learn) with --mask_dir, or drop --masked_loss")
    if whole:
        log.warning("--masked_loss: %d of %d images have no mask (no transparency%s); they are learned whole",
                    whole, len(rows), ", no file in --mask_dir" if mask_dir else "")


def _relative(image: Path, roots) -> Path | None:
    for root in roots:
        if root and image.is_relative_to(root):
            return image.relative_to(root)
    return None


def _index(folder: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Mask files by relative path without extension (5_dog/a.png masks 5_dog/a.jpg), and by name alone."""
    by_path: dict[str, Path] = {}
    by_name: dict[str, list[Path]] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.suffix.lower() not in IMAGE_EXTS or any(part.startswith(".") for part in rel.parts):
            continue
        key = rel.with_suffix("").as_posix()
        if key in by_path:
            raise UserError(f"--mask_dir {folder}: two masks for '{key}' ({by_path[key].name}, {p.name}); keep one")
        by_path[key] = p
        by_name.setdefault(p.stem, []).append(p)
    return by_path, by_name


def _transparent(path: Path) -> bool:
    with Image.open(path) as img:
        return has_alpha(img) and transparent(img)
