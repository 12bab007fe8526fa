"""Training on the command line: the flags both recipes share, `run` (what a recipe's `main` does),
and `sdlora train text-to-image|dreambooth …`, which runs the same recipes from an installed package.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from ..errors import UserError
from ..lora.inject import UNET_TARGETS
from ..quantize import MODES as QUANTIZE_MODES

RECIPES = {"text-to-image": "train_text_to_image_lora", "dreambooth": "train_dreambooth_lora"}


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="Hub id, local diffusers folder, or 'sdlora-tiny' (the bundled tiny model)")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--allow_pickle", action="store_true",
                   help="allow loading .bin (pickle) weights when no safetensors exist; only for models you trust")
    g.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                   help="default: the base's scheduler config (v_prediction for SD 2.x 768-v bases)")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="a VAE to train with instead of the base's, e.g. madebyollin/sdxl-vae-fp16-fix (SDXL's own "
                        "VAE overflows in fp16, so it is kept in fp32 otherwise)")
    g.add_argument("--zero_terminal_snr", action="store_true",
                   help="rescale the noise schedule to zero terminal SNR (kohya; diffusers' rescale_betas_zero_snr); "
                        "for v-prediction")


def add_training_args(p: argparse.ArgumentParser):
    """Flags both scripts share; each script then sets its own defaults with `p.set_defaults`."""
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default=None)
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="run in an --output_dir that already holds files: an earlier sdlora run's LoRA, card and "
                        "samples there are replaced; files sdlora did not write are left as they are (one named like "
                        "a file the run writes stops it before it starts)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--resolution", type=int, default=None,
                   help="default: the base's own size, its UNet's sample_size x the VAE's downsampling (512 for "
                        "SD 1.5, 1024 for SDXL, 32 for sdlora-tiny)")
    g.add_argument("--center_crop", action="store_true", help="centre crops (default: random crops, as diffusers)")
    g.add_argument("--random_crop", action="store_true", help="kohya's flag: random crops, the default here")
    g.add_argument("--random_flip", "--flip_aug", action="store_true", help="flip half the images (--flip_aug: kohya)")
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
    g.add_argument("--adam_weight_decay_text_encoder", type=float, default=None,
                   help="weight decay of the text encoders' LoRA (default: --adam_weight_decay)")
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: accelerate's config / `accelerate launch --mixed_precision`")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet's training steps (the first step compiles; slower on the CPUs "
                        "measured, see the README)")
    g.add_argument("--quantize_base", default="none", choices=QUANTIZE_MODES,
                   help="QLoRA-style: keep the UNet's frozen Linear weights in 8 bits (int8: bitsandbytes' LLM.int8) "
                        "or 4 bits (nf4: QLoRA's NormalFloat4) while the LoRA trains in fp32; convolutions stay as "
                        "they are. Needs bitsandbytes (a CUDA GPU, or an x86-64 CPU with AVX2). Saves memory, not "
                        "time; the saved LoRA is the same kind of file (see the README)")
    g.add_argument("--no_cache", action="store_true",
                   help="don't cache VAE latents / text embeddings (they are cached automatically when possible)")
    g.add_argument("--cache_latents_to_disk", action="store_true",
                   help="keep cached VAE latents in files under --latents_cache_dir, read per batch and reused by "
                        "later runs, instead of in RAM (kohya's flag; for data sets whose latents don't fit in RAM)")
    g.add_argument("--latents_cache_dir", default=None, metavar="DIR",
                   help="where --cache_latents_to_disk keeps them (default: $XDG_CACHE_HOME/sdlora/latents, "
                        "else ~/.cache/sdlora/latents)")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")

    g = p.add_argument_group("aspect-ratio buckets (kohya's flag names), masked loss, held-out loss")
    g.add_argument("--no_bucket", action="store_true",
                   help="square --resolution crops instead of aspect-ratio buckets (buckets are on by default)")
    g.add_argument("--enable_bucket", action="store_true", help="accepted for kohya commands; buckets are the default")
    g.add_argument("--min_bucket_reso", type=int, default=None, help="smallest bucket side (default: resolution/2)")
    g.add_argument("--max_bucket_reso", type=int, default=None, help="largest bucket side (default: 2 x resolution)")
    g.add_argument("--bucket_reso_steps", type=int, default=None,
                   help="bucket sides are multiples of this (default: the model's, 64 for SD)")
    g.add_argument("--bucket_no_upscale", action="store_true",
                   help="images smaller than resolution² train at their own size (floored to whole steps)")
    g.add_argument("--masked_loss", "--alpha_mask", action="store_true",
                   help="weight the loss by a mask: the image's alpha channel, or its file in --mask_dir (white = learn)")
    g.add_argument("--mask_dir", default=None, help="masks named like their images (any image format)")
    g.add_argument("--validation_split", type=float, default=None,
                   help="hold this fraction of the training images out to measure a validation loss")
    g.add_argument("--validation_data_dir", default=None, help="a folder of held-out images (and captions)")
    g.add_argument("--validation_loss_steps", type=int, default=None,
                   help="compute the held-out loss every N steps (default: every epoch and at the end)")

    g = p.add_argument_group("captions", "kohya's caption operations, applied every step (not to DreamBooth's "
                             "class prompt); captions that change every step are not pre-encoded")
    g.add_argument("--shuffle_caption", action="store_true", help="shuffle the caption's tags every step")
    g.add_argument("--keep_tokens", type=int, default=0,
                   help="the first N tags stay in place (not shuffled or dropped)")
    g.add_argument("--keep_tokens_separator", default="",
                   help="in captions that contain it, what comes before it stays in place (so does what comes "
                        "after a second one); e.g. '|||'")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0,
                   help="train on an empty caption this often, e.g. 0.05")
    g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                   help="drop each tag not kept in place this often, e.g. 0.1")
    g.add_argument("--caption_separator", default=",", help="what separates tags (default: %(default)s)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--lora_alpha", type=float, default=None, help="default: equal to --rank (scale 1)")
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--lora_type", default="lora", choices=["lora", "dora", "loha", "lokr", "adalora"],
                   help="dora: weight-decomposed LoRA (peft's use_dora, diffusers' --use_dora): each output channel's "
                        "magnitude trained apart from its direction; loha / lokr: LyCORIS's Hadamard / Kronecker "
                        "product layers (peft's LoHa/LoKr; --rank is their rank, --lora_alpha their alpha). LoHa/LoKr "
                        "files load in ComfyUI, A1111/Forge and sdlora, not in diffusers' load_lora_weights; adalora: ranks "
                        "pruned during training from --adalora_init_r down to an average of --rank per layer "
                        "(peft's AdaLoRA), saved as plain LoRA at each layer's final rank")
    g.add_argument("--adalora_init_r", type=int, default=None, help="AdaLoRA's starting rank per layer "
                   "(default: 1.5 x --rank)")
    g.add_argument("--adalora_tinit", type=int, default=None,
                   help="AdaLoRA: steps at the starting ranks before pruning (default: 10%% of the steps)")
    g.add_argument("--adalora_tfinal", type=int, default=None,
                   help="AdaLoRA: last steps trained at the final ranks (default: 20%% of the steps)")
    g.add_argument("--adalora_delta_t", type=int, default=1, help="AdaLoRA: prune every N steps")
    g.add_argument("--init_lora_weights", default="gaussian", choices=["gaussian", "pissa", "olora"],
                   help="gaussian: the adapter starts as a no-op (A random, B zero); pissa / olora: A and B start from "
                        "the layer's principal singular vectors / a QR of it, the frozen weight keeps the rest "
                        "(Linear layers only); saved files hold the change from the unmodified base, at twice the rank")
    g.add_argument("--use_rslora", action="store_true",
                   help="rank-stabilised LoRA: scale by alpha/sqrt(rank) instead of alpha/rank; the files record the "
                        "equivalent alpha (alpha*sqrt(rank)), so every loader applies the same scale")
    g.add_argument("--target_modules", default=",".join(UNET_TARGETS),
                   help="comma-separated UNet module names to adapt (default: %(default)s)")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="also train LoRA on the CLIP text encoder's q/k/v/out projections (both of SDXL's)")
    g.add_argument("--save_precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--output_kohya_format", action="store_true",
                   help="accepted for diffusers' SDXL commands: the kohya-layout file is always written")

    g = p.add_argument_group("checkpoints, logging, validation, hub")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N path")
    g.add_argument("--logging_dir", default="logs", help="relative to --output_dir")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "none", "all"])
    g.add_argument("--validation_prompt", default=None)
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_epochs", type=int, default=1)
    g.add_argument("--sample_prompts", default=None, metavar="FILE",
                   help="text file, one prompt per line with kohya's options (--n negative, --w width, --h height, "
                        "--s steps, --l guidance, --d seed); PNGs and a grid per round in output_dir/samples/. "
                        "Without --sample_every_n_steps/--sample_every_n_epochs: one round at the end")
    g.add_argument("--sample_every_n_steps", type=int, default=None, metavar="N",
                   help="sample the --sample_prompts every N optimizer steps")
    g.add_argument("--sample_every_n_epochs", type=int, default=None, metavar="N",
                   help="sample the --sample_prompts every N epochs (with --sample_every_n_steps: at both)")
    g.add_argument("--sample_at_first", action="store_true",
                   help="also sample the --sample_prompts before training starts (in a new run: the untrained LoRA)")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_token", default=None, help="default: $HF_TOKEN or your saved login")
    g.add_argument("--hub_model_id", default=None)


def run(args, make_recipe, on_start=None, **hooks) -> int:
    """What both recipes do after parsing: check, claim the output folder, read data, train, share.

    Every problem the user can fix surfaces before any model is loaded, as one line on stderr, and leaves no
    output folder behind that this run made. `on_start(config)` is called once the folder is held and the data
    read, before any model loads; `hooks` go to the training loop (`on_step`, `should_stop`; the UI uses them).
    Ctrl+C / SIGTERM (training/interrupt.py): once training runs, the run stops after its step with a checkpoint,
    before that at once; one line says so, and the exit status is 130 / 143 (128 + the signal's number, as a shell
    reports a process those signals ended).
    """
    from ..output import hub
    from ..training import interrupt, outdir
    from ..training.config import check
    from ..training.hooks import Hooks
    from ..training.loop import train
    from . import setup_logging

    token = hub.resolve_token(args.hub_token)
    setup_logging(token)
    made = _first_missing(Path(args.output_dir)) if args.output_dir else None
    signals = interrupt.Interrupts().install()
    try:
        config = check(args, token)
        # One process per run holds the folder: the one that writes (rank 0 under `accelerate launch`).
        with outdir.claim(config, holder=_is_main()):
            recipe = make_recipe(args, config)
            if on_start:
                on_start(config)
            path = train(config, recipe, Hooks(**dict(hooks, should_stop=signals.polled(hooks.get("should_stop")))))
            if signals.signum:
                return _interrupted(signals, config)
            if path is not None and config.push_to_hub:
                interrupt.entered("push")
                hub.push(config.output_dir, config.hub_model_id, token)
    except UserError as e:
        if made is not None:
            _remove_empty(Path(args.output_dir), made)
        print(f"error: {hub.redact(str(e), token)}", file=sys.stderr)
        return 2
    except interrupt.Stopped as e:  # before training started, while uploading, or a second signal
        if made is not None:
            _remove_empty(Path(args.output_dir), made)
        if _is_main():
            print(interrupt.describe(e, Path(args.output_dir) if args.output_dir else None), file=sys.stderr)
        return e.exit_code
    finally:
        signals.restore()
    return 0


def _interrupted(signals, config) -> int:
    """The exit status of a run a signal came to once training ran: the loop stopped it at a step (and said so),
    or it came after the last step, so the run finished (only the upload is skipped)."""
    if signals.stopped:
        return signals.exit_code
    main = _is_main()
    if main:
        print(f"interrupted ({signals.name}) as the run ended: its LoRA is saved in {config.output_dir}"
              f"{'; not uploaded to the hub' if config.push_to_hub else ''}", file=sys.stderr)
    return signals.exit_code if config.push_to_hub and main else 0


def _is_main() -> bool:
    """Whether this is the process that holds the folder and speaks (rank 0 under `accelerate launch`)."""
    return int(os.environ.get("RANK", "0")) == 0


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (what this run would create), or None."""
    folder = folder.expanduser().absolute()
    missing = None
    for p in [folder, *folder.parents]:
        if p.exists():
            return missing
        missing = p
    return missing


def _remove_empty(folder: Path, up_to: Path):
    """Remove `folder` and its parents up to `up_to`, each only while empty (a failed run made them)."""
    from ..training.manifest import remove_if_alone

    folder = folder.expanduser().absolute()
    remove_if_alone(folder)  # the record of a run that wrote nothing
    for p in [folder, *folder.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == up_to:
            return


def _train_cli(args):
    """`sdlora train RECIPE FLAGS…`: the recipe module's own `main`, so flags and behaviour are the script's."""
    recipe = importlib.import_module(RECIPES[args.recipe])
    return recipe.main(args.flags)


def register(sub):
    s = sub.add_parser("train", help="train a LoRA (same flags as train_text_to_image_lora.py / train_dreambooth_lora.py)",
                       description="Run a training recipe; `sdlora train text-to-image --help` lists its flags.")
    s.add_argument("recipe", choices=list(RECIPES))
    s.add_argument("flags", nargs=argparse.REMAINDER, help="the recipe's flags")
    s.set_defaults(func=_train_cli)
