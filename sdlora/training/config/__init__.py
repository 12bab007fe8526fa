"""The training configuration: every setting the loop reads, declared once with its default and its help.

Settings are grouped by what they are about, one module each (base, run, data, optim, noise, speed, lora, outcome,
outputs, flow); `TrainConfig` is their union. A new group is a new module plus one base class below. A field made with
`setting(...)` is also a command-line flag of the same name (or metadata "flag"): the CLI generates the flag
from the field (sdlora/cli/flags.py), so its default and help live there only. Tags in the metadata say what
else a setting is: "resume" ("must match" / "optional": recorded in checkpoints, see fields_tagged), "card"
(the model card's label for it) and "header" (its safetensors header keys).
`checks.check` resolves and validates the settings a command line gave, before any model loads.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ...errors import UserError
from .base import BaseSettings
from .data import DataSettings
from .declare import LR_SCHEDULERS, MUST_MATCH, OPTIONAL, flag_name, setting
from .flow import FlowSettings
from .lora import LoraSettings
from .noise import NoiseSettings
from .optim import OptimSettings
from .outcome import OutcomeSettings
from .outputs import OutputSettings
from .run import RunSettings
from .speed import SpeedSettings

__all__ = ["TrainConfig", "LR_SCHEDULERS", "MUST_MATCH", "OPTIONAL", "setting", "flag_name", "from_flags",
           "fields_tagged", "tags_of", "default_of", "adalora_schedule"]


# Dataclasses order inherited fields from the last base to the first, so the groups are listed last-first:
# the fields (and so --help, the card and the header) read base model, run, data, optim, noise, speed, LoRA, outcome,
# outputs, then SD3's flow settings.
@dataclass(frozen=True, kw_only=True)
class TrainConfig(FlowSettings, OutputSettings, OutcomeSettings, LoraSettings, SpeedSettings, NoiseSettings,
                  OptimSettings, DataSettings, RunSettings, BaseSettings):
    def tracker_config(self) -> dict:
        """What the experiment trackers record (plain values only; the token is never part of a config)."""
        return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in asdict(self).items() if v is not None and k != "sample_prompts"}  # the file is there


def from_flags(values: Mapping[str, Any]) -> TrainConfig:
    """The settings among `values` (flag name -> value, as a parsed command line has them), unresolved and
    unchecked (`checks.check` does both); settings a recipe has no flag for keep their defaults."""
    given = {f.name: values[flag_name(f)] for f in fields(TrainConfig) if flag_name(f) in values}
    return TrainConfig(**given)


def fields_tagged(tag: str) -> dict[str, Any]:
    """{field name: tag value} of the fields carrying `tag` ("resume", "card", "header"), in declaration order."""
    return {f.name: f.metadata[tag] for f in fields(TrainConfig) if tag in f.metadata}


def tags_of(name: str) -> Mapping[str, Any]:
    """A field's declaration: its help, argparse extras and tags (e.g. the card's label for it)."""
    return next(f.metadata for f in fields(TrainConfig) if f.name == name)


def default_of(name: str) -> Any:
    """A field's declared default (e.g. an "optional" resume setting's value when a checkpoint lacks it)."""
    return next(f.default for f in fields(TrainConfig) if f.name == name)


def adalora_schedule(config, max_steps: int) -> tuple[int, int, int]:
    """(init_r, tinit, tfinal) for a run of `max_steps`; a schedule that leaves no step to prune in is one line."""
    init_r = config.adalora_init_r or config.rank + max(1, config.rank // 2)
    tinit = max_steps // 10 if config.adalora_tinit is None else config.adalora_tinit
    tfinal = max_steps // 5 if config.adalora_tfinal is None else config.adalora_tfinal
    if tinit >= max_steps - tfinal:
        raise UserError(f"--adalora_tinit {tinit} and --adalora_tfinal {tfinal} leave no step of the {max_steps} to "
                        "prune ranks in; lower them or train longer")
    return init_r, tinit, tfinal
