"""Files the page shows: copies in Gradio's own temp folder (the only place it may fetch from), and thumbnails."""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import UserError


def served(path) -> str:
    """A copy of `path` in Gradio's own temp folder, which is what the page may fetch: Gradio serves only that
    (and the working directory), while data and output folders can be anywhere. Byte for byte, so a downloaded
    PNG keeps its parameters. Only a regular file that is not a link: a link someone put in a run's folder could
    point at any of the user's files."""
    from gradio.utils import get_upload_folder

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with open(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{path}: not a regular file")
        os.makedirs(get_upload_folder(), exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=get_upload_folder()))
        with open(folder / Path(path).name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return str(folder / Path(path).name)


def served_sample(path):
    """(served copy, file name) for a gallery, or None for a file gone or replaced by a link since the folder was
    read."""
    try:
        return served(path), Path(path).name
    except (OSError, UserError):
        return None


def thumbnail(path, size: int = 256):
    from PIL import Image

    with Image.open(path) as im:
        im.thumbnail((size, size))
        return im.convert("RGB")
