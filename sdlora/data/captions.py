"""Caption operations applied every step, as kohya's trainers do: whole-caption dropout, tag shuffling
around a fixed prefix (--keep_tokens, --keep_tokens_separator), and tag dropout.

The semantics are those of kohya sd-scripts' `process_caption`, so a kohya data set and its flags train
on the same captions. Every draw comes from the generator passed in (TrainSet's, one per seed, epoch,
example and slot), so a caption is a pure function of it and resume stays exact.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError

log = logging.getLogger(__name__)


def _flag(default, flag: str, help: str):
    """A field that is the flag --`flag` (sdlora/cli/flags.py makes it from this default and help)."""
    return field(default=default, metadata={"flag": flag, "help": help})


@dataclass(frozen=True)
class CaptionOps:
    shuffle: bool = _flag(False, "shuffle_caption", "shuffle the caption's tags every step")
    # leading tags that stay in place (ignored where keep_tokens_separator splits the caption)
    keep_tokens: int = _flag(0, "keep_tokens", "the first N tags stay in place (not shuffled or dropped)")
    # text before it stays fixed; after a second one, a fixed suffix
    keep_tokens_separator: str = _flag("", "keep_tokens_separator", "in captions that contain it, what comes before "
                                       "it stays in place (so does what comes after a second one); e.g. '|||'")
    dropout_rate: float = _flag(0.0, "caption_dropout_rate",  # whole caption -> ""
                                "train on an empty caption this often, e.g. 0.05")
    tag_dropout_rate: float = _flag(0.0, "caption_tag_dropout_rate",  # each flexible tag
                                    "drop each tag not kept in place this often, e.g. 0.1")
    separator: str = _flag(",", "caption_separator", "what separates tags (default: %(default)s)")

    @property
    def varies(self) -> bool:
        """True when a caption's text changes between steps beyond being dropped whole."""
        return self.shuffle or self.tag_dropout_rate > 0

    @property
    def active(self) -> bool:
        return self.varies or self.dropout_rate > 0

    def describe(self) -> str:
        """One line for the model card, e.g. 'shuffled (first 1 kept), caption dropout 0.1, tag dropout 0.05'."""
        keep = f"'{self.keep_tokens_separator}' separator" if self.keep_tokens_separator else \
            f"first {self.keep_tokens} kept" if self.keep_tokens else ""
        parts = [f"shuffled{f' ({keep})' if keep else ''}"] * self.shuffle + \
                [f"caption dropout {self.dropout_rate:g}"] * (self.dropout_rate > 0) + \
                [f"tag dropout {self.tag_dropout_rate:g}"] * (self.tag_dropout_rate > 0)
        return ", ".join(parts)

    def split(self, text: str) -> tuple[list[str], list[str], list[str]]:
        """(fixed prefix, flexible tags, fixed suffix), split as kohya splits them."""
        ks, sep = self.keep_tokens_separator, self.separator
        if ks and ks in text:
            fixed, flex = text.split(ks, 1)
            flex, _, suffix = flex.partition(ks)

            def tags(s):
                return [t.strip() for t in s.split(sep) if t.strip()]
            return tags(fixed), tags(flex), tags(suffix)
        tags = [t.strip() for t in text.strip().split(sep)]
        return tags[:self.keep_tokens], tags[self.keep_tokens:], []

    def apply(self, text: str, rng: np.random.Generator) -> str:
        if not self.active:
            return text  # and no draw: runs without caption ops keep the random stream they always had
        if self.dropout_rate > 0 and rng.random() < self.dropout_rate:
            return ""
        if not self.varies:
            return text  # kohya leaves the text alone unless it shuffles or drops tags
        fixed, flex, suffix = self.split(text)
        if self.shuffle:
            flex = [flex[i] for i in rng.permutation(len(flex))]
        if self.tag_dropout_rate > 0:
            flex = [t for t, r in zip(flex, rng.random(len(flex))) if r >= self.tag_dropout_rate]
        return ", ".join(fixed + flex + suffix)


def checked(ops: CaptionOps) -> CaptionOps | None:
    """The caption settings (as the flags gave them), checked (one line each); None when none changes a caption."""
    for flag, v in (("caption_dropout_rate", ops.dropout_rate), ("caption_tag_dropout_rate", ops.tag_dropout_rate)):
        if not 0 <= v < 1:
            raise UserError(f"--{flag} must be in [0, 1) (got {v}); e.g. 0.1 drops one in ten")
    if ops.keep_tokens < 0:
        raise UserError(f"--keep_tokens must be >= 0 (got {ops.keep_tokens}): how many leading tags stay in place")
    if not ops.separator:
        raise UserError("--caption_separator is empty; give the text between tags, e.g. ','")
    if (ops.keep_tokens or ops.keep_tokens_separator) and not ops.varies:
        log.warning("--keep_tokens / --keep_tokens_separator do nothing without --shuffle_caption or "
                    "--caption_tag_dropout_rate")
    return ops if ops.active else None


def check_keep_tokens(ops: CaptionOps | None, rows) -> None:
    """A caption with fewer tags than --keep_tokens would be all prefix: nothing to shuffle or drop, which is
    almost always a mistake (another separator, a caption file that isn't tags)."""
    if ops is None or not ops.keep_tokens or not ops.varies:
        return
    for r in rows:
        for text in r.caption if isinstance(r.caption, list) else [r.caption]:
            if not text.strip() or ops.keep_tokens_separator and ops.keep_tokens_separator in text:
                continue  # empty captions were allowed explicitly; the separator overrides --keep_tokens (kohya)
            n = len(text.strip().split(ops.separator))
            if n < ops.keep_tokens:
                shown = json.dumps(text if len(text) <= 40 else text[:39] + "…", ensure_ascii=False)
                raise UserError(f"{r.name}: its caption {shown} has {n} tag{'s' * (n != 1)} (separated by "
                                f"{ops.separator!r}), fewer than --keep_tokens {ops.keep_tokens}; lower --keep_tokens "
                                f"or add tags to the caption")
