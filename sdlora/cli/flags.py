"""The flags both recipes share, made from the settings' declarations (training/config/'s TrainConfig,
data/captions.py's CaptionOps): a flag's default, help, type and choices are written there, once; here is only
which group shows it, in which order, and the few flags that are no setting."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields

from ..data.captions import CaptionOps, checked
from ..training.checks import check
from ..training.config import TrainConfig, flag_name, from_flags
from ..training.config.flow import FlowSettings

_TYPES = {"int": int, "float": float}  # every other setting's flag is a string (paths stay strings until checked)
DATA_DIRS = ("train_data_dir", "instance_data_dir", "class_data_dir")  # the recipes' image folders


def add_settings(group, *names: str, cls=TrainConfig):
    """Add the flags of `cls`'s fields `names` to `group` (a parser or an argument group), as declared."""
    declared = {f.name: f for f in fields(cls)}
    for name in names:
        _add(group, declared[name])


def _add(group, f: Field):
    meta = f.metadata
    names = [f"--{meta.get('flag', f.name)}", *(f"--{a}" for a in meta.get("aliases", ()))]
    extras = {k: meta[k] for k in ("choices", "metavar", "required", "nargs") if k in meta}
    kind = str(f.type).split("|")[0].strip()
    if kind == "bool" and f.default is True:  # diffusers' --prodigy_* switches, on by default: a true/false word
        group.add_argument(*names, type=_yes_no, nargs="?", const=True, default=True, metavar="true|false",
                           help=meta["help"], **extras)
        return
    if kind == "bool":
        group.add_argument(*names, action="store_true", help=meta["help"], **extras)
        return
    default = None if f.default is MISSING else f.default
    if isinstance(default, tuple) and "nargs" not in meta:
        default = ",".join(default)  # a list setting's flag is comma-separated
    group.add_argument(*names, type=_TYPES.get(kind), default=default, help=meta["help"], **extras)


def _yes_no(word: str) -> bool:
    """A switch's value as a word (diffusers' --prodigy_decouple False means off, not on)."""
    if word.lower() in ("true", "yes", "1", "on"):
        return True
    if word.lower() in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{word!r} is not true or false")


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    add_settings(g, "base_name", "base_config", "revision", "variant", "cache_dir", "allow_pickle", "prediction_type",
                 "pretrained_vae_model_name_or_path", "zero_terminal_snr", "clip_skip")
    g.add_argument("--v_parameterization", dest="prediction_type", action="store_const", const="v_prediction",
                   help="kohya's name for --prediction_type v_prediction")


def add_training_args(p: argparse.ArgumentParser):
    """Flags both scripts share; each script then sets its own defaults (its DEFAULTS) with `p.set_defaults`."""
    g = p.add_argument_group("training")
    add_settings(g, "output_dir", "overwrite_output_dir", "seed", "resolution", "center_crop", "random_crop",
                 "random_flip", "train_batch_size", "num_train_epochs", "max_train_steps",
                 "gradient_accumulation_steps", "gradient_checkpointing", "learning_rate", "scale_lr", "lr_scheduler",
                 "lr_warmup_steps", "lr_num_cycles", "lr_power", "snr_gamma", "noise_offset", "use_8bit_adam",
                 "allow_tf32", "dataloader_num_workers", "adam_beta1", "adam_beta2", "adam_weight_decay",
                 "adam_weight_decay_text_encoder", "adam_epsilon", "max_grad_norm", "mixed_precision",
                 "enable_xformers_memory_efficient_attention", "compile", "quantize_base", "no_cache",
                 "cache_latents_to_disk", "latents_cache_dir")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")

    g = p.add_argument_group("optimizer", "diffusers' and kohya's optimizer flags; any optimizer but AdamW: "
                             'pip install "sdlora[optimizers]"')
    add_settings(g, "optimizer", "optimizer_args", "unet_lr", "prodigy_beta3", "prodigy_decouple",
                 "prodigy_use_bias_correction", "prodigy_safeguard_warmup", "loraplus_lr_ratio",
                 "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")

    g = p.add_argument_group("noise and loss", "kohya's options, by its names and with its formulas")
    add_settings(g, "multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma",
                 "ip_noise_gamma_random_strength", "min_timestep", "max_timestep", "loss_type", "huber_schedule",
                 "huber_c", "huber_scale", "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred",
                 "v_pred_like_loss")

    g = p.add_argument_group("EMA and early stopping", "which weights the run ends with")
    add_settings(g, "use_ema", "ema_decay", "ema_warmup", "ema_power", "early_stopping_patience")

    g = p.add_argument_group("aspect-ratio buckets (kohya's flag names), masked loss, held-out loss")
    add_settings(g, "no_bucket", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                 "bucket_no_upscale", "masked_loss", "mask_dir", "validation_split", "validation_data_dir",
                 "validation_loss_steps")

    g = p.add_argument_group("captions", "kohya's caption operations, applied every step (not to DreamBooth's "
                             "class prompt); captions that change every step are not pre-encoded")
    add_settings(g, *(f.name for f in fields(CaptionOps)), cls=CaptionOps)

    g = p.add_argument_group("LoRA")
    add_settings(g, "rank", "lora_alpha", "lora_dropout", "lora_type", "adalora_init_r", "adalora_tinit",
                 "adalora_tfinal", "adalora_delta_t", "init_lora_weights", "use_rslora", "target_modules",
                 "train_text_encoder", "save_precision")
    g.add_argument("--output_kohya_format", action="store_true",
                   help="accepted for diffusers' SDXL commands: the kohya-layout file is always written")

    g = p.add_argument_group("Stable Diffusion 3 / 3.5 bases", "diffusers' SD3 script's flag names and defaults; other "
                             "bases ignore them")
    add_settings(g, *(f.name for f in fields(FlowSettings)), cls=FlowSettings)

    g = p.add_argument_group("checkpoints, logging, validation, hub")
    add_settings(g, "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "logging_dir",
                 "report_to", "validation_prompt", "num_validation_images", "validation_epochs", "sample_prompts_file",
                 "sample_every_n_steps", "sample_every_n_epochs", "sample_at_first", "push_to_hub")
    g.add_argument("--hub_token", default=None, help="default: $HF_TOKEN or your saved login")
    add_settings(g, "hub_model_id")


def set_defaults(p: argparse.ArgumentParser, defaults: dict):
    """A recipe's own defaults for settings (its DEFAULTS), each a TrainConfig field whose declared default it
    changes."""
    flags = {f.name: flag_name(f) for f in fields(TrainConfig)}
    p.set_defaults(**{flags[k]: v for k, v in defaults.items()})


def caption_ops(args: argparse.Namespace) -> CaptionOps | None:
    """The parsed caption flags, checked; None when none changes a caption."""
    return checked(CaptionOps(**{f.name: getattr(args, f.metadata["flag"]) for f in fields(CaptionOps)}))


def train_config(args: argparse.Namespace, token: str | None = None) -> TrainConfig:
    """A recipe's parsed flags as a checked, resolved TrainConfig (loads no model; see training/checks.py)."""
    return check(from_flags(vars(args)), token, data={k: getattr(args, k) for k in DATA_DIRS if hasattr(args, k)},
                 hub_token=args.hub_token, prior_preservation=bool(getattr(args, "with_prior_preservation", False)))
