"""Coloured-shape images, their captions, and deterministic pixel-statistics detectors.

Everything the tiny base model (`sdlora/assets/tiny-sd`) was trained on comes from here, and so
do the example data sets and every evaluation: no downloaded model, only numpy and PIL.

Images are 32x32 RGB: one shape (circle, square or triangle) of one palette colour on a
background of another palette colour, captioned like "a red circle on a blue background".

Three looks share the same subjects:

* ``"plain"``    — the base model's training data (flat shape, flat background);
* ``"creature"`` — the "Pokémon-style" look the base model never saw: the shape drawn as a
  creature with a thick black outline and two white eyes with black pupils;
* ``"subject"``  — the DreamBooth subject: one specific square, a cyan/magenta 2x2 checker.

Detectors (all take a PIL image or an HxWx3 uint8 array):

* :func:`detect` — background colour, shape colour and shape kind;
* :func:`style_score` / :func:`is_styled` — how much an image has the creature look;
* :func:`subject_score` / :func:`is_subject` — whether the DreamBooth subject is drawn.

The palette has no black, white, cyan or magenta: those are what the two new looks use, so the
base model can't produce them by accident.
"""
from __future__ import annotations

import random
from collections import deque

import numpy as np
from PIL import Image, ImageDraw

RES = 32          # image side
SS = 4            # supersampling factor used when drawing (anti-aliased edges)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 40),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "pink": (250, 150, 200),
    "gray": (128, 128, 128),
}
COLOURS = list(PALETTE)
SHAPES = ("circle", "square", "triangle")

# (shape colour, background colour) pairs never shown to the base model, for every shape: each
# colour is held out once as a shape colour and once as a background (a derangement), so the
# model has seen every word in both roles but never these combinations.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "green"), ("orange", "purple"), ("yellow", "blue"), ("green", "pink"),
    ("blue", "orange"), ("purple", "gray"), ("pink", "red"), ("gray", "yellow"),
)

SUBJECT_COLOURS = {"cyan": (20, 215, 220), "magenta": (225, 25, 225)}
DREAMBOOTH_TOKEN = "sks"
INSTANCE_PROMPT = f"a {DREAMBOOTH_TOKEN} square"
CLASS_PROMPT = "a square"
# The subject's photos show it on these backgrounds only; DreamBooth is measured on the other four,
# contexts it was never photographed in.
SUBJECT_PHOTO_BGS = ("red", "yellow", "green", "gray")
SUBJECT_HELD_OUT_BGS = tuple(c for c in PALETTE if c not in SUBJECT_PHOTO_BGS)

# Every word a caption can use (the tokenizer gives each one token).
VOCAB_WORDS = ["a", "an", "on", "background"] + COLOURS + list(SHAPES)


def with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def caption(shape: str, colour: str | None, bg: str | None) -> str:
    """'a red circle on an orange background'; colour or bg None leaves that part out."""
    text = with_article(f"{colour} {shape}" if colour else shape)
    return text + (f" on {with_article(bg)} background" if bg else "")


def all_pairs() -> list[tuple[str, str]]:
    return [(c, b) for c in COLOURS for b in COLOURS if c != b]


def train_pairs() -> list[tuple[str, str]]:
    held = set(HELD_OUT_PAIRS)
    return [p for p in all_pairs() if p not in held]


# ---------------------------------------------------------------------------------- drawing
def random_spec(rng: random.Random, pairs=None, shapes=SHAPES) -> dict:
    """A random shape/colour/background/size/position."""
    colour, bg = rng.choice(pairs if pairs is not None else train_pairs())
    size = rng.randint(13, 21)                       # shape side / diameter in pixels
    margin = 3
    half = size / 2
    cx = rng.uniform(margin + half, RES - margin - half)
    cy = rng.uniform(margin + half, RES - margin - half)
    return dict(shape=rng.choice(shapes), colour=colour, bg=bg, size=size, cx=cx, cy=cy)


def _outline(shape: str, cx: float, cy: float, size: float):
    """Polygon / bbox in supersampled pixel coordinates."""
    s, x, y, h = SS, cx * SS, cy * SS, size * SS / 2
    if shape == "circle" or shape == "square":
        return [x - h, y - h, x + h, y + h]
    if shape == "triangle":  # upright, base at the bottom
        return [(x, y - h), (x + h, y + h), (x - h, y + h)]
    raise ValueError(shape)


def _draw_shape(d: ImageDraw.ImageDraw, shape, box, fill, outline=None, width=0):
    if shape == "circle":
        d.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "square":
        d.rectangle(box, fill=fill, outline=outline, width=width)
    else:
        d.polygon(box, fill=fill, outline=outline, width=width)


def render(spec: dict, look: str = "plain") -> Image.Image:
    """Draw one 32x32 image. look: 'plain', 'creature' or 'subject' (see module doc)."""
    bg = PALETTE[spec["bg"]]
    img = Image.new("RGB", (RES * SS, RES * SS), bg)
    d = ImageDraw.Draw(img)
    shape, cx, cy, size = spec["shape"], spec["cx"], spec["cy"], spec["size"]
    box = _outline(shape, cx, cy, size)
    if look == "plain":
        _draw_shape(d, shape, box, PALETTE[spec["colour"]])
    elif look == "creature":
        _draw_shape(d, shape, box, PALETTE[spec["colour"]], outline=(0, 0, 0), width=2 * SS)
        # two eyes: white discs with black pupils, in the widest part of the shape
        ey = cy + (size * 0.12 if shape == "triangle" else -size * 0.12)
        dx = size * (0.21 * 0.85 if shape == "triangle" else 0.21)
        # Eyes big enough to survive the 4x-downsampling VAE and a LoRA's averaging, scaled down on
        # shapes under 20 px so they stay inside the body: fixed-size eyes covered small triangles
        # whole, leaving no body colour to see (or to learn).
        k = min(1.0, size / 20)
        r_eye, r_pupil = 2.8 * k, 1.0 * k
        for ex in (cx - dx, cx + dx):
            d.ellipse([(ex - r_eye) * SS, (ey - r_eye) * SS, (ex + r_eye) * SS, (ey + r_eye) * SS],
                      fill=(255, 255, 255))
            d.ellipse([(ex - r_pupil) * SS, (ey - r_pupil + 0.4 * k) * SS, (ex + r_pupil) * SS,
                       (ey + r_pupil + 0.4 * k) * SS], fill=(0, 0, 0))
    elif look == "subject":
        x0, y0, x1, y1 = _outline("square", cx, cy, size)
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
        c, m = SUBJECT_COLOURS["cyan"], SUBJECT_COLOURS["magenta"]
        d.rectangle([x0, y0, xm, ym], fill=c)
        d.rectangle([xm, y0, x1, ym], fill=m)
        d.rectangle([x0, ym, xm, y1], fill=m)
        d.rectangle([xm, ym, x1, y1], fill=c)
    else:
        raise ValueError(f"unknown look {look!r}")
    return img.resize((RES, RES), Image.BOX)


_EXTREMES = [(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
             (0, 255, 255), (255, 0, 255)]


def random_clutter(rng: random.Random) -> Image.Image:
    """A generic image (random shapes, lines and dots in arbitrary colours, some outlined).

    Used only to train the VAE as a general 32 px image codec, so it can also encode looks the
    diffusion model never saw (outlines, small dots); it carries no captions.
    """
    def col():  # uniform RGB, or an extreme colour (black, white, primaries, ...) jittered
        if rng.random() < 0.4:
            base = rng.choice(_EXTREMES)
            return tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in base)
        return tuple(rng.randint(0, 255) for _ in range(3))

    img = Image.new("RGB", (RES * SS, RES * SS), col())
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(SHAPES + ("line", "dot"))
        x, y = rng.uniform(0, RES), rng.uniform(0, RES)
        size = rng.uniform(4, 22)
        if kind == "line":
            x2, y2 = rng.uniform(0, RES), rng.uniform(0, RES)
            d.line([x * SS, y * SS, x2 * SS, y2 * SS], fill=col(), width=rng.randint(1, 3) * SS)
        elif kind == "dot":
            r = rng.uniform(0.7, 2.5)
            d.ellipse([(x - r) * SS, (y - r) * SS, (x + r) * SS, (y + r) * SS], fill=col())
        else:
            outline = (col() if rng.random() < 0.5 else (0, 0, 0)) if rng.random() < 0.6 else None
            _draw_shape(d, kind, _outline(kind, x, y, size), col(), outline=outline,
                        width=rng.randint(1, 2) * SS if outline else 0)
    return img.resize((RES, RES), Image.BOX)


# -------------------------------------------------------------------------------- detectors
def _arr(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image, dtype=np.float32)
    if a.shape[0] != RES or a.shape[1] != RES:
        a = np.asarray(Image.fromarray(a.clip(0, 255).astype(np.uint8)).resize((RES, RES), Image.BOX),
                       dtype=np.float32)
    return a


_PAL = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


def nearest_colour(rgb) -> str:
    return COLOURS[int(np.argmin(((_PAL - np.asarray(rgb, np.float32)) ** 2).sum(-1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list = []
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                comp, q = [], deque([(i, j)])
                seen[i, j] = True
                while q:
                    y, x = q.popleft()
                    comp.append((y, x))
                    for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                        if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            q.append((yy, xx))
                if len(comp) > len(best):
                    best = comp
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _background(a: np.ndarray) -> np.ndarray:
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3),
                             a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def _silhouette(a: np.ndarray, bg_rgb: np.ndarray) -> np.ndarray:
    """Pixels clearly unlike the background, largest 4-connected blob, holes filled."""
    far = np.sqrt(((a - bg_rgb) ** 2).sum(-1)) > 60
    blob = _largest_component(far)
    # fill holes: background-like pixels not connected to the border
    outside = _largest_component(np.pad(~blob, 1, constant_values=True))[1:-1, 1:-1]
    return ~outside


def _dark(a):
    return a.max(-1) < 80


def _white(a):
    return a.min(-1) > 185


def detect(image) -> dict:
    """{'bg': colour, 'colour': colour or None, 'shape': shape or None, 'area': pixels}.

    bg: nearest palette colour to the median of the 2-pixel border.  colour: nearest palette
    colour most of the silhouette's inner pixels are nearest to (near-black and near-white pixels — outlines,
    eyes — excluded).  shape: from the silhouette's fill of its bounding box (square ~1.0,
    circle ~0.79, triangle ~0.5).
    """
    a = _arr(image)
    bg_rgb = _background(a)
    out = {"bg": nearest_colour(bg_rgb), "colour": None, "shape": None, "area": 0}
    sil = _silhouette(a, bg_rgb)
    area = int(sil.sum())
    out["area"] = area
    if area < 12:
        return out
    edge = _boundary(sil)
    core = sil & ~edge & ~_boundary(sil & ~edge)       # away from anti-aliased / outlined edges
    keep = ~_dark(a) & ~_white(a)
    px = a[core & keep] if (core & keep).sum() >= 6 else a[sil & keep]
    if len(px) >= 6:   # most common nearest-palette colour (robust to blended edge pixels)
        idx = np.argmin(((px[:, None, :] - _PAL[None]) ** 2).sum(-1), axis=1)
        out["colour"] = COLOURS[int(np.bincount(idx, minlength=len(COLOURS)).argmax())]
    ys, xs = np.nonzero(sil)
    fill = area / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    out["fill"] = round(float(fill), 3)
    out["shape"] = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    return out


def _boundary(sil: np.ndarray) -> np.ndarray:
    p = np.pad(sil, 1, constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return sil & ~inner


def style_parts(image) -> dict:
    """The creature look's two parts: outline (share of the silhouette's edge ring that is
    near-black) and eyes (near-white pixels inside the shape)."""
    a = _arr(image)
    sil = _silhouette(a, _background(a))
    if sil.sum() < 12:
        return {"outline": 0.0, "eyes": 0}
    edge = _boundary(sil)
    ring = edge | _boundary(sil & ~edge)          # 2-pixel edge ring
    outline = float(_dark(a)[ring].mean())
    inner = sil & ~ring
    eyes = int((_white(a) & inner).sum())
    return {"outline": round(outline, 3), "eyes": eyes}


def style_score(image) -> float:
    """0..1: half from the dark outline (full at >= 50 % of the edge ring), half from the eyes
    (full at >= 4 white pixels inside the shape).  Plain images score ~0, creatures ~1."""
    p = style_parts(image)
    return round(0.5 * min(p["outline"] / 0.5, 1.0) + 0.5 * min(p["eyes"] / 4, 1.0), 3)


def is_styled(image, threshold: float = 0.6) -> bool:
    return style_score(image) >= threshold


def subject_quadrants(image) -> list[float]:
    """For each quadrant of the silhouette's bounding box (top-left, top-right, bottom-left, bottom-right), the
    share of its pixels within reach of the colour the subject's checker has there (cyan on the diagonal,
    magenta off it); all 0 when there is no shape."""
    a = _arr(image)
    sil = _silhouette(a, _background(a))
    if sil.sum() < 12:
        return [0.0] * 4
    ys, xs = np.nonzero(sil)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    ym, xm = (y0 + y1) / 2, (x0 + x1) / 2
    c, m = (np.array(SUBJECT_COLOURS[k], np.float32) for k in ("cyan", "magenta"))
    yy, xx = np.mgrid[:RES, :RES] + 0.5
    shares = []
    for top in (True, False):
        for left in (True, False):
            q = sil & ((yy < ym) == top) & ((xx < xm) == left)
            want = c if top == left else m
            shares.append(float((np.sqrt(((a[q] - want) ** 2).sum(-1)) < 90).mean()) if q.sum() else 0.0)
    return shares


def subject_score(image) -> float:
    """0..1: how well the silhouette's four quadrants match the subject's cyan/magenta checker: the mean of
    `subject_quadrants`."""
    return round(sum(subject_quadrants(image)) / 4, 3)


def is_subject(image, threshold: float = 0.5) -> bool:
    """The checker in every quadrant: each quadrant at least `threshold` its own colour. (A mean over quadrants
    let a plain cyan square, or a cyan/magenta blob without the checker, pass at 0.5.)"""
    return min(subject_quadrants(image)) >= threshold


def prompt_following(images, specs) -> dict:
    """Share of images whose detected background colour / shape colour / shape match specs."""
    n = len(images)
    hits = {"bg": 0, "colour": 0, "shape": 0, "all": 0}
    for im, s in zip(images, specs):
        d = detect(im)
        ok = {k: d[k] == s[k] for k in ("bg", "colour", "shape")}
        for k, v in ok.items():
            hits[k] += v
        hits["all"] += all(ok.values())
    return {k: v / max(n, 1) for k, v in hits.items()} | {"n": n}
