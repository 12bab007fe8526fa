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
