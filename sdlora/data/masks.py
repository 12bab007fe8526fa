"""Loss masks (--masked_loss): which part of each image is learned, so a subject's background is not.

A row's mask is its image's own alpha channel, or the same-name image in --mask_dir (white = learn,
black = ignore, grey in between). Rows with neither are learned whole, and the log says how many.
"""
from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from ..errors import UserError
from .images import IMAGE_EXTS, check_image, has_alpha
from .sources import Row

log = logging.getLogger(__name__)


def attach(rows: list[Row], mask_dir: Path | None) -> None:
    """Set each row's `mask`; a mask that can't be used is a one-line error naming it, before any model loads."""
    masks = _index(mask_dir) if mask_dir else {}
    whole = 0
    for r in rows:
        if not isinstance(r.image, Path):
            whole += 1  # a `datasets` row: no file to find a mask beside
            continue
        found = masks.get(r.image.stem)
        if found is not None:
            size = check_image(found)
            if isinstance(size, str):
                raise UserError(f"{found}: {size}; replace the mask of {r.image.name}")
            if size != r.size:
                raise UserError(f"{found}: mask is {size[0]}x{size[1]} but its image {r.image} is {r.size[0]}x{r.size[1]}; "
                                f"save the mask at the image's size")
            r.mask = found
        elif _has_alpha(r.image):
            r.mask = "alpha"
        else:
            whole += 1
    if whole == len(rows):
        where = f"no file in --mask_dir {mask_dir} is named like an image" if mask_dir else \
            "no image has an alpha channel"
        raise UserError(f"--masked_loss: {where}; give masks (white = learn) with --mask_dir, or drop --masked_loss")
    if whole:
        log.warning("--masked_loss: %d of %d images have no mask (no alpha channel%s); they are learned whole",
                    whole, len(rows), ", no file in --mask_dir" if mask_dir else "")


def _index(folder: Path) -> dict[str, Path]:
    """Mask files by name without extension (a.png masks a.jpg)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            if p.stem in found:
                raise UserError(f"--mask_dir {folder}: two masks for '{p.stem}' ({found[p.stem].name}, {p.name}); "
                                f"keep one")
            found[p.stem] = p
    return found


def _has_alpha(path: Path) -> bool:
    with Image.open(path) as img:
        return has_alpha(img)
