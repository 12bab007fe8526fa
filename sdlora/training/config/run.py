"""Settings of the run itself: where it writes, its seed, what it resumes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .declare import setting


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    output_dir: Path | None = setting(help="where the LoRA, its model card, samples and checkpoints are written "
                                           "(default: %(default)s)")  # each recipe has its own default
    overwrite_output_dir: bool = setting(
        False, "run in an --output_dir that already holds files: an earlier sdlora run's LoRA, card and samples there "
               "are replaced; files sdlora did not write are left as they are (one named like a file the run writes "
               "stops it before it starts)")
    inputs: tuple[Path, ...] = ()  # resolved: folders and files the flags name to read (or cache into)
    logging_dir: str = setting("logs", "relative to --output_dir")
    seed: int | None = setting(help="random seed (default: a random one, drawn and recorded in the checkpoints and "
                                    "the file)", card="seed", header="ss_seed")
    resume_from_checkpoint: str | None = setting(help="'latest' or a checkpoint-N path")
