"""Resuming: the checkpoint to continue, the run's seed, and the settings that must match for a resumed run to
continue exactly the run that wrote the checkpoint (`settings`, the one list of them)."""
from __future__ import annotations

import logging
import random
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from . import checkpoint
from .config import OPTIONAL as OPTIONAL_TAG
from .config import TrainConfig, adalora_schedule, default_of, fields_tagged
from .trainable import trained_names

log = logging.getLogger("sdlora")

# LR schedules whose value at step s depends on the total number of steps.
DECAYING = {"linear", "cosine", "cosine_with_restarts", "polynomial"}

# The settings a resumed run must share with its checkpoint are the config fields tagged resume= (config/); a
# "optional" one is recorded only when it differs from its default, so a checkpoint from before that flag existed
# matches a run without it.
OPTIONAL = {name: default_of(name) for name, tag in fields_tagged("resume").items() if tag == OPTIONAL_TAG}


def settings(config: TrainConfig, recipe, world: int, max_steps: int, lr: float) -> dict:
    """Everything that must be the same for a resumed run to continue the one that wrote the checkpoint: the tagged
    fields, as this run resolved them, and the facts of the data and processes."""
    c = config
    resolved = {  # fields whose value the run works out (or records in a portable form)
        "base_name": _local(c.base_name),
        "pretrained_vae_model_name_or_path": _local(c.pretrained_vae_model_name_or_path),
        "learning_rate": lr, "text_encoder_lr": c.text_encoder_lr or lr, "target_modules": list(c.target_modules),
        "bucketing": asdict(c.bucketing) if c.bucketing else None, "tokenizer_max_length": recipe.max_length,
        "text_encoder_use_attention_mask": recipe.use_attention_mask}
    s = {}
    for name, tag in fields_tagged("resume").items():
        if tag == OPTIONAL_TAG and getattr(c, name) == OPTIONAL[name]:
            continue
        s[RECORDED_AS.get(name, name)] = resolved[name] if name in resolved else getattr(c, name)
    s.update(num_processes=world, loss_weights=recipe.group_weights, num_rows=len(recipe.data.rows),
             data=recipe.data.digest(),
             captions=asdict(recipe.data.caption_ops) if recipe.data.caption_ops else None)
    if c.lr_scheduler in DECAYING:
        s["max_train_steps"] = max_steps
    if c.lora_type == "adalora":  # a schedule with no room to prune fails here, before any model loads
        s["adalora"] = list(adalora_schedule(c, max_steps)) + [c.adalora_delta_t]
    return s


RECORDED_AS = {"base_name": "base_model"}  # the name checkpoints have always stored it under


def _local(path: str | None) -> str | None:
    """A local folder as an absolute path (the same wherever the run is resumed from); a Hub id as it is."""
    if path and Path(path).expanduser().exists():
        return str(Path(path).expanduser().resolve())
    return path


def check(config: TrainConfig, ckpt, settings: dict, main: bool):
    """Refuse (one line) a resume whose settings or seed differ from the checkpoint's."""
    saved = {**OPTIONAL, **ckpt.settings}
    changed, unknown = checkpoint.differences(saved, {**OPTIONAL, **settings})
    if config.seed is not None and config.seed != ckpt.seed:
        changed.append(f"seed {ckpt.seed} -> {config.seed}")
    if changed:
        raise UserError(f"--resume_from_checkpoint {ckpt.path}: this run's settings differ from the checkpoint's "
                        f"({'; '.join(changed)}); resume with the same settings, or start a new run in another "
                        f"--output_dir")
    if unknown and main:
        log.warning("%s predates the settings check: %s not verified", ckpt.path, ", ".join(unknown))


def find_checkpoint(config: TrainConfig, main: bool):
    """The checkpoint --resume_from_checkpoint names, read whole (None: a new run)."""
    if not config.resume_from_checkpoint:
        return None
    found = checkpoint.find(config.output_dir, config.resume_from_checkpoint)
    if found is None:
        if main:
            log.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run", config.output_dir)
        return None
    return checkpoint.read(found, trained_names(config))


def seed(config: TrainConfig, ckpt, world: int) -> int:
    """The seed drives every random choice; a resumed run takes the one it started with."""
    seed = ckpt.seed if ckpt else (config.seed if config.seed is not None else random.SystemRandom().randrange(2**31))
    if world > 1:  # one seed for all processes, or each would shard a different shuffle
        from accelerate.utils import broadcast_object_list

        seed = broadcast_object_list([seed])[0]
    return seed
