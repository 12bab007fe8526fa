"""A folder's captions as a table to edit (the UI's Dataset tab): read each image's caption, and write back only
the ones that changed, atomically and only beside images the folder holds."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..io import write_text
from .folder import plan


def read_captions(folder, extension: str = ".txt", recursive: bool = False) \
        -> tuple[list[tuple[str, str]], list[tuple[Path, str]]]:
    """([(image path relative to the folder, its caption or "")], [(file, why it is skipped)]): the images vetted
    and the captions read as `sdlora caption --append` reads them."""
    p = plan(folder, extension, "append", recursive)
    rows = [(item.image.relative_to(p.folder).as_posix(), item.existing or "") for item in p.items]
    return rows, p.skipped


def save_captions(folder, rows, extension: str = ".txt", recursive: bool = False) -> list[Path]:
    """Write each (image, caption) row whose caption differs from its file's; an empty caption where there is no
    file writes none. Rows must name images `read_captions` lists. Returns the files written."""
    p = plan(folder, extension, "append", recursive)
    files = {item.image.relative_to(p.folder).as_posix(): item for item in p.items}
    written = []
    for name, text in rows:
        name, text = str(name), " ".join(str(text or "").split())
        if name not in files:
            raise UserError(f"{name}: not an image of {folder} whose caption can be edited; reload the folder")
        cap = files[name].caption
        if text == (files[name].existing or "") or (not text and not cap.exists()):
            continue
        write_text(cap, text + "\n")
        written.append(cap)
    return written
