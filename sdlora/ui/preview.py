"""What a training run would read from its data folder, shown before it starts: images with their captions, the
bucket table, and the files that would be skipped and why. The rows are the recipe's own (`rows`), so a folder the
run would refuse gives the run's own one-line error here, and each image shows the caption the run trains on."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..data import buckets as bucketing
from ..data.sources import scan_folder
from ..recipes import RECIPES
from ..training.checks import sizing
from ..training.config import from_flags


@dataclass
class Preview:
    images: list = field(default_factory=list)  # [(path, caption)], the first `limit`
    count: int = 0
    buckets: list = field(default_factory=list)  # [("W×H", images)]
    skipped: list = field(default_factory=list)  # [(path, why)]
    summary: str = ""


def preview(recipe: str, args, limit: int = 24) -> Preview:
    """The data a run with these parsed recipe flags would train on; raises the run's UserError."""
    if getattr(args, "dataset_config", None):
        return subsets_preview(args, limit)
    what = RECIPES[recipe].DATA_FLAG
    folder = Path(getattr(args, what.removeprefix("--")))
    quiet = logging.getLogger("sdlora.data.sources")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the skipped files are listed, not logged
    try:
        _, skipped = scan_folder(folder, what, getattr(args, "caption_extension", ".txt"))
        rows = RECIPES[recipe].rows(args)
    finally:
        quiet.setLevel(level)
    _, resolution, b = sizing(from_flags(vars(args)),
                              prior_preservation=bool(getattr(args, "with_prior_preservation", False)))
    table = b.table()
    sizes = [r.size for r in rows]
    assigned = [b.assign(s, table) for s in sizes]
    counts, mean, square = bucketing.report([s for s, a in zip(sizes, assigned) if a],
                                            [a for a in assigned if a], resolution)
    p = Preview(count=len(rows), skipped=[(str(s), why) for s, why in skipped])
    p.images = [(str(r.image), r.caption if isinstance(r.caption, str) else " | ".join(r.caption))
                for r in rows[:limit]]
    p.buckets = [(f"{w}×{h}", n) for (w, h), n in counts.items()]
    dropped = assigned.count(None)
    p.summary = (f"{len(rows)} image(s) at {resolution} px" + (", square crops" if not b.enabled else
                 f" in {len(counts)} bucket(s): {mean:.0%} of each image kept on average ({square:.0%} with square "
                 "crops)") + (f"; {dropped} too small for any bucket" if dropped else "") +
                 (f"; {len(skipped)} file(s) skipped" if skipped else ""))
    return p


def subsets_preview(args, limit: int = 24) -> Preview:
    """A --dataset_config's subsets, one line each (folder, images, repeats, regularisation, captions, size), and
    its first images with the captions they train on."""
    from ..data import datasetconfig

    config = from_flags(vars(args))
    _, resolution, b = sizing(config)
    fallback = {"caption_extension": args.caption_extension, "resolution": resolution, "enable_bucket": b.enabled,
                "bucket_reso_steps": b.step, "min_bucket_reso": b.min_reso, "max_bucket_reso": b.max_reso,
                "bucket_no_upscale": b.no_upscale, "flip_aug": args.random_flip, "alpha_mask": args.masked_loss,
                "keep_tokens": args.keep_tokens, "shuffle_caption": args.shuffle_caption}
    datasets = datasetconfig.read(args.dataset_config, fallback)
    got = datasetconfig.layout(datasets, args.caption_column, args.allow_empty_captions)
    lines, p = [], Preview(count=len(got.rows))
    for k, (part, (d, s)) in enumerate(zip(got.parts, [(d, s) for d in datasets for s in d.subsets])):
        ids = [i for i, r in enumerate(got.row_parts) if r == k]
        uses = sum(1 for e in got.examples if got.row_parts[e[0]] == k)
        lines.append(f"- {part.name}: {len(ids)} image(s), {uses} per epoch (num_repeats {s.num_repeats})"
                     f"{', regularisation (is_reg)' if s.is_reg else ''}, captions {s.caption_extension}"
                     f"{f' or {s.class_tokens!r}' if s.class_tokens else ''}, {d.bucketing.resolution} px")
    p.images = [(str(r.image), r.caption if isinstance(r.caption, str) else " | ".join(r.caption))
                for r in got.rows[:limit]]
    p.summary = f"{len(got.rows)} image(s) in {len(got.parts)} subset(s), {len(got.examples)} per epoch:\n" + \
        "\n".join(lines)
    return p
