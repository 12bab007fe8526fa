"""Flags shared by both training scripts (diffusers' names and meanings) and their checks.

`check` runs before any model is loaded: every contradiction, missing package or unusable
path is one line naming the flag and what to do.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from pathlib import Path

import torch

from .errors import UserError
from .lora import UNET_TARGETS


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="Hub id, local diffusers folder, or 'sdlora-tiny' (the bundled tiny model)")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--allow_pickle", action="store_true",
                   help="allow loading .bin (pickle) weights when no safetensors exist; only for models you trust")
    g.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"])


def add_training_args(p: argparse.ArgumentParser):
    """Flags both scripts share; each script then sets its own defaults with `p.set_defaults`."""
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--resolution", type=int, default=512)
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--train_batch_size", type=int, default=1)
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true")
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--lr_num_cycles", type=int, default=1)
    g.add_argument("--lr_power", type=float, default=1.0)
    g.add_argument("--snr_gamma", type=float, default=None)
    g.add_argument("--noise_offset", type=float, default=0.0)
    g.add_argument("--use_8bit_adam", action="store_true")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: accelerate's config / `accelerate launch --mixed_precision`")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    g.add_argument("--no_cache", action="store_true",
                   help="don't cache VAE latents / text embeddings (they are cached automatically when possible)")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--lora_alpha", type=float, default=None, help="default: equal to --rank (scale 1)")
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--target_modules", default=",".join(UNET_TARGETS),
                   help="comma-separated UNet module names to adapt (default: %(default)s)")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="also train LoRA on the CLIP text encoder's q/k/v/out projections")
    g.add_argument("--save_precision", default="fp32", choices=["fp32", "fp16", "bf16"])

    g = p.add_argument_group("checkpoints, logging, validation, hub")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N path")
    g.add_argument("--logging_dir", default="logs", help="relative to --output_dir")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "none", "all"])
    g.add_argument("--validation_prompt", default=None)
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_epochs", type=int, default=1)
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_token", default=None, help="default: $HF_TOKEN or your saved login")
    g.add_argument("--hub_model_id", default=None)


def _positive(name, value, minimum=1):
    if value is not None and value < minimum:
        raise UserError(f"--{name} must be >= {minimum} (got {value})")


def check(args) -> None:
    """Validate flags, packages, devices and paths. Cheap: loads no model."""
    args.target_modules = [m.strip() for m in str(args.target_modules).split(",") if m.strip()] \
        if isinstance(args.target_modules, str) else args.target_modules
    if not args.target_modules:
        raise UserError("--target_modules is empty; e.g. --target_modules to_q,to_k,to_v,to_out.0")
    for name in ("resolution", "train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "rank",
                 "num_validation_images", "validation_epochs"):
        _positive(name, getattr(args, name))
    _positive("max_train_steps", args.max_train_steps)
    _positive("checkpointing_steps", args.checkpointing_steps)
    _positive("checkpoints_total_limit", args.checkpoints_total_limit)
    if args.resolution % 8:
        raise UserError(f"--resolution must be a multiple of 8 (got {args.resolution})")
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be > 0 (got {args.learning_rate})")
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be in [0, 1) (got {args.lora_dropout})")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        raise UserError(f"--lora_alpha must be > 0 (got {args.lora_alpha})")
    if args.lora_alpha is not None and float(args.lora_alpha).is_integer():
        args.lora_alpha = int(args.lora_alpha)  # "8", not "8.0", in metadata viewers
    if args.report_to == "all":
        args.report_to = "tensorboard" if importlib.util.find_spec("wandb") is None else "all"
    if args.report_to in ("wandb",) and importlib.util.find_spec("wandb") is None:
        raise UserError("--report_to wandb needs the wandb package: pip install wandb (or use --report_to tensorboard)")
    if args.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None \
            and importlib.util.find_spec("tensorboardX") is None:
        raise UserError("--report_to tensorboard needs tensorboard: pip install tensorboard (or --report_to none)")
    if args.hub_token and args.report_to in ("wandb", "all"):
        raise UserError("--hub_token together with --report_to wandb would expose the token in wandb's logged "
                        "config; use `huggingface-cli login` or HF_TOKEN instead")
    if args.push_to_hub and not args.hub_model_id:
        args.hub_model_id = Path(args.output_dir).resolve().name

    cuda = torch.cuda.is_available()
    mp = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mp == "fp16" and not cuda:
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")
    if args.enable_xformers_memory_efficient_attention:
        if importlib.util.find_spec("xformers") is None:
            raise UserError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                            "(pip install xformers, CUDA only); PyTorch's SDPA attention is used by default")
        if not cuda:
            raise UserError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; drop the flag on CPU")
    if args.use_8bit_adam:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes; needs a CUDA GPU)")
        if not cuda:
            raise UserError("--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit optimizers); drop the flag on CPU")
    check_output_dir(Path(args.output_dir))


def check_output_dir(out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"--output_dir {out}: not writable ({e.strerror}); choose another folder") from None


def setup_logging(token: str | None = None):
    """Plain INFO logs on stderr (the main process only), with any token redacted."""
    import logging

    from .hub import RedactToken
    from .logs import silence_noise

    silence_noise()

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if token:
        handler.addFilter(RedactToken(token))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # Only the main process speaks, so a skipped file is named once, not once per process.
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.getLogger("sdlora").setLevel(logging.INFO if rank == 0 else logging.ERROR)
