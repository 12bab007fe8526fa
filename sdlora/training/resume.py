"""Resuming: the checkpoint to continue, the run's seed, and the settings that must match for a resumed run to
continue exactly the run that wrote the checkpoint (`settings`, the one list of them)."""
from __future__ import annotations

import logging
import random
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from . import checkpoint
from .config import TrainConfig, adalora_schedule
from .trainable import trained_names

log = logging.getLogger("sdlora")

# LR schedules whose value at step s depends on the total number of steps.
DECAYING = {"linear", "cosine", "cosine_with_restarts", "polynomial"}

# Settings recorded only when they differ from these defaults (a missing one means the default, see `check`).
OPTIONAL = {"pretrained_vae_model_name_or_path": None, "zero_terminal_snr": False,
            "adam_weight_decay_text_encoder": None, "quantize_base": "none"}


def settings(config: TrainConfig, recipe, world: int, max_steps: int, lr: float) -> dict:
    """Everything that must be the same for a resumed run to continue the one that wrote the checkpoint."""
    base = config.base_name
    if Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())
    c = config
    s = {
        "base_model": base, "revision": c.revision, "variant": c.variant,
        "rank": c.rank, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout, "use_rslora": c.use_rslora,
        "init_lora_weights": c.init_lora_weights, "lora_type": c.lora_type,
        "target_modules": list(c.target_modules), "train_text_encoder": c.train_text_encoder,
        "learning_rate": lr, "text_encoder_lr": c.text_encoder_lr or lr, "lr_scheduler": c.lr_scheduler,
        "lr_warmup_steps": c.lr_warmup_steps, "lr_num_cycles": c.lr_num_cycles, "lr_power": c.lr_power,
        "use_8bit_adam": c.use_8bit_adam, "adam_beta1": c.adam_beta1, "adam_beta2": c.adam_beta2,
        "adam_weight_decay": c.adam_weight_decay, "adam_epsilon": c.adam_epsilon, "max_grad_norm": c.max_grad_norm,
        "train_batch_size": c.train_batch_size, "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "num_processes": world, "resolution": c.resolution, "center_crop": c.center_crop,
        "random_flip": c.random_flip, "noise_offset": c.noise_offset, "snr_gamma": c.snr_gamma,
        "prediction_type": c.prediction_type, "loss_weights": recipe.group_weights,
        "tokenizer_max_length": recipe.max_length, "text_encoder_use_attention_mask": recipe.use_attention_mask,
        "num_rows": len(recipe.data.rows), "data": recipe.data.digest(), "bucketing": asdict(c.bucketing),
        "masked_loss": c.masked_loss,
        "captions": asdict(recipe.data.caption_ops) if recipe.data.caption_ops else None,
    }
    if c.lr_scheduler in DECAYING:
        s["max_train_steps"] = max_steps
    for k, default in OPTIONAL.items():
        if getattr(c, k) != default:  # only when used: a checkpoint from before these flags matches a run without
            s[k] = getattr(c, k)
    vae = s.get("pretrained_vae_model_name_or_path")
    if vae and Path(vae).expanduser().exists():  # a local VAE folder, wherever the run is resumed from
        s["pretrained_vae_model_name_or_path"] = str(Path(vae).expanduser().resolve())
    if c.lora_type == "adalora":  # a schedule with no room to prune fails here, before any model loads
        s["adalora"] = list(adalora_schedule(c, max_steps)) + [c.adalora_delta_t]
    return s


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
