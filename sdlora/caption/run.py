"""Captioning a planned folder (folder.py) batch by batch: each caption is written as soon as its batch is done,
atomically (sdlora/io.py), so a killed run leaves whole captions and no half-written one, and a rerun (which skips
what has a caption now) carries on where it stopped."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..data.images import read_image
from ..errors import UserError
from ..io import write_text
from .folder import Plan, leftovers
from .tags import SEPARATOR, compose, frequency, merged

log = logging.getLogger(__name__)


@dataclass
class Summary:
    written: list[tuple[Path, str]] = field(default_factory=list)  # (caption file, its text)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    tags: Counter = field(default_factory=Counter)  # a tagger's tags: how many captions each is in
    dry_run: bool = False

    def text(self, top: int = 20) -> str:
        """The run in a few lines: files written, skipped grouped by reason, the most frequent tags."""
        verb = "would write" if self.dry_run else "wrote"
        lines = [f"{verb} {len(self.written)} caption(s), skipped {len(self.skipped)} file(s)"]
        reasons = Counter(why.split(" (")[0] if "exists (" in why else why for _, why in self.skipped)
        for why, n in reasons.most_common():
            if "exists" in why:
                why = "a caption exists (--overwrite replaces it, --append adds to it)"
            lines.append(f"  skipped {n}: {why}")
        if self.tags:
            lines.append(f"tag frequency ({len(self.tags)} tags; top {min(top, len(self.tags))}): " +
                         ", ".join(f"{t} {n}" for t, n in self.tags.most_common(top)))
        return "\n".join(lines)


@dataclass(frozen=True)
class Wording:
    prefix: str = ""  # e.g. a trigger word
    suffix: str = ""
    separator: str = SEPARATOR


def _load(item, skipped):
    try:
        return read_image(item.image)
    except Exception as e:  # noqa: BLE001 - changed since the plan vetted it: PIL raises many types
        skipped.append((item.image, f"unreadable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})"))
        return None


def caption_folder(plan: Plan, captioner, wording: Wording = Wording(), batch_size: int = 1, dry_run: bool = False,
                   on_batch=None) -> Summary:
    """Caption `plan.items` with `captioner` (a list of images -> a list of captions); `on_batch(done, total)` after
    each batch. An empty caption from the model is skipped, not written."""
    if batch_size < 1:
        raise UserError(f"--batch_size {batch_size}: must be at least 1")
    summary = Summary(skipped=list(plan.skipped), dry_run=dry_run)
    if not dry_run:
        for tmp in leftovers(plan):
            tmp.unlink(missing_ok=True)
    items, done = plan.items, 0
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        loaded = [(item, im) for item in batch if (im := _load(item, summary.skipped)) is not None]
        captions = captioner([im for _, im in loaded]) if loaded else []
        for (item, _), caption in zip(loaded, captions):
            if not caption.strip():
                summary.skipped.append((item.image, "the model gave an empty caption"))
                continue
            if captioner.tags:
                summary.tags.update(frequency([caption], wording.separator))
            text = compose(caption, wording.prefix, wording.suffix, wording.separator)
            if item.existing is not None:
                text = merged(item.existing, text, wording.separator) if item.existing else text
            if not dry_run:
                write_text(item.caption, text + "\n")
            summary.written.append((item.caption, text))
        done += len(batch)
        if on_batch:
            on_batch(done, len(items))
    return summary
