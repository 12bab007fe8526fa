"""Reading one image: any format and mode PIL opens becomes RGB, and a file that can't be used says why."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


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
    if has_alpha(img):
        # Composite transparency on white, the usual expectation for cut-out subjects.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def read_mask(path, alpha: bool) -> Image.Image:
    """A loss mask as 8-bit greyscale (white = learn), EXIF orientation applied as it is to images: an image's
    alpha channel (`alpha`), or a mask file — its alpha when it has transparency (a cut-out: the subject is
    what is opaque), else its grey levels (a float image in 0..1 scaled to 0..255)."""
    img = Image.open(path)
    img.load()
    img = ImageOps.exif_transpose(img)
    if alpha or (has_alpha(img) and transparent(img)):
        return img.convert("RGBA").getchannel("A")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if a.max() <= 1.0 else a
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    return to_rgb(img).convert("L")


def transparent(img: Image.Image) -> bool:
    """Whether any pixel of an image with an alpha channel is less than fully opaque."""
    return img.convert("RGBA").getchannel("A").getextrema()[0] < 255


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
