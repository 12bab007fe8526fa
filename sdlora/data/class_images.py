"""DreamBooth's own data: the instance-prompt check and the prior-preservation class images.

Class images are written one at a time under stable, seeded names (class-00000.png, …), each
atomically, so a run killed mid-way resumes where it stopped and a finished folder is reused
as is.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..io import save_image
from .images import IMAGE_EXTS, check_image
from .sources import link_problem

log = logging.getLogger(__name__)


def existing_images(folder: Path) -> list[Path]:
    """Readable images in `folder`; symlinks that rows_from_images would skip (broken, loops, out of it) don't count."""
    if not folder.is_dir():
        return []
    root = folder.resolve()
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
                  and link_problem(p, root, "") is None and isinstance(check_image(p), tuple))


def missing_names(folder: Path, wanted: int) -> list[str]:
    """Names to generate so `folder` holds `wanted` readable images (user-supplied ones count)."""
    have = existing_images(folder)
    need = wanted - len(have)
    taken = {p.name for p in folder.iterdir()} if folder.is_dir() else set()  # an unreadable file is still not ours
    names, i = [], 0
    while len(names) < need:
        name = f"class-{i:05d}.png"
        if name not in taken:
            names.append(name)
        i += 1
    return names


def generate(base: str, folder: Path, prompt: str, wanted: int, resolution: int, batch_size: int, seed: int,
             dtype: torch.dtype, device, steps: int = 25, revision=None, variant=None, cache_dir=None,
             allow_pickle: bool = False, progress: bool = True, on_image=None, base_config=None) -> int:
    """Fill `folder` up to `wanted` images of `prompt`; returns how many were generated.

    Image `class-0000i.png` always comes from seed (seed, i), so an interrupted generation
    finished later gives the same images as an uninterrupted one.
    """
    names = missing_names(folder, wanted)
    if not names:
        log.info("class images: %s already holds %d, generating none", folder, wanted)
        return 0
    from tqdm.auto import tqdm

    from .. import pipeline

    log.info("class images: generating %d of %r into %s", len(names), prompt, folder)
    pipe = pipeline.load_base(base, dtype, allow_pickle, revision, variant, cache_dir, base_config,
                              safety_checker=None, requires_safety_checker=False)
    pipeline.set_scheduler(pipe, "dpm++")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    folder.mkdir(parents=True, exist_ok=True)
    done = 0
    with tqdm(total=len(names), desc="class images", disable=not progress) as bar:
        # batches aligned on the image index, so a resumed run samples each image in the same batch as an
        # uninterrupted one (sampling is not batch-invariant bit for bit)
        todo, last = set(names), max(int(n[6:11]) for n in names)
        for g in sorted({int(n[6:11]) // batch_size for n in names}):
            chunk = [f"class-{i:05d}.png" for i in range(g * batch_size, min((g + 1) * batch_size, last + 1))]
            seeds = [seed * 100_003 + int(n[6:11]) for n in chunk]
            images = pipeline.sample(pipe, [prompt] * len(chunk), seeds, steps, batch=len(chunk),
                                     width=resolution, height=resolution)
            for name, img in zip(chunk, images):
                if name not in todo:
                    continue  # already on disk; sampled only to keep the batch as it was
                save_image(img, folder / name)
                done += 1
                bar.update(1)
                if on_image:
                    on_image(folder / name)
    del pipe
    return done


# Tokens known to be rare in SD1.x's vocabulary, used by DreamBooth guides.
KNOWN_RARE = {"sks", "ohwx", "zwx", "xyz", "szn", "bnha", "phol", "mrx", "tok", "vfx"}
COMMON = {"a", "an", "the", "of", "my", "our", "his", "her", "this", "that", "one", "big", "small", "old", "new",
          "red", "blue", "cute", "dog", "cat", "man", "toy", "photo", "on", "in", "at", "with", "and", "for", "to"}


def identifier(instance_prompt: str, class_prompt: str | None) -> tuple[str, str]:
    """(the word before the class word, the class word) in the instance prompt: 'a photo of sks dog' -> (sks, dog)."""
    words = instance_prompt.lower().replace(",", " ").split()
    class_words = (class_prompt or "").lower().replace(",", " ").split()
    cls = next((w for w in reversed(class_words) if w in words), None) or (words[-1] if words else "")
    idx = max((i for i, w in enumerate(words) if w == cls), default=-1)
    return (words[idx - 1] if idx > 0 else ""), cls


def identifier_warning(instance_prompt: str, class_prompt: str | None) -> str | None:
    """A warning when the instance prompt has no rare identifier right before the class word."""
    prev, cls = identifier(instance_prompt, class_prompt)
    rare = prev in KNOWN_RARE or (prev and not prev.isalpha()) or (
        prev and len(prev) <= 4 and prev not in COMMON and not prev.endswith(("ing", "ed")))
    if rare:
        return None
    return (f"--instance_prompt {instance_prompt!r} has no rare identifier before the class word {cls!r} "
            f"(e.g. 'a photo of sks {cls}'): without one, training rewrites what {cls!r} itself means, so every "
            f"{cls} starts to look like your subject; a rare token gives the subject its own name")
