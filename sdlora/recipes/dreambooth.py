"""DreamBooth LoRA: teach Stable Diffusion one subject from 5-10 photos, with prior preservation.

Same flags as diffusers' examples/dreambooth/train_dreambooth_lora.py, plus --repeats,
--text_encoder_lr, --snr_gamma, --noise_offset and --instance_captions.

    python train_dreambooth_lora.py --pretrained_model_name_or_path sdlora-tiny \
        --instance_data_dir examples/data/dreambooth/instance --instance_prompt "a sks square" --instance_captions \
        --with_prior_preservation --class_prompt "a square" --resolution 32 --output_dir out

Reads top to bottom: flags -> instance rows (+ class rows, generated if missing) -> the shared
training loop (sdlora/training/loop.py). Only the data and the loss weights differ from text-to-image.
Also installed with the package: `sdlora train dreambooth …` runs this file's `main`.
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import replace
from pathlib import Path

from ..cli import flags
from ..cli.parser import Parser
from ..cli.run import run
from . import configfile
from ..data import captions, class_images, masks
from ..data.sources import Row, check_caption, dataset_label, rows_from_folder, rows_from_images, split_heldout
from ..data.trainset import TrainSet, heldout_set
from ..errors import UserError
from ..models import fast_precision, torch_dtype
from ..training import interrupt
from ..training.config import TrainConfig
from ..training.run import Recipe
from ..training.manifest import Manifest

log = logging.getLogger("sdlora")

SCRIPT = "train_dreambooth_lora"  # the top-level script that runs `main` (the UI names runs by it)
DATA_FLAG = "--instance_data_dir"
DEFAULTS = {"output_dir": "lora-dreambooth-model", "train_batch_size": 4, "learning_rate": 5e-4,
            "validation_epochs": 50}  # settings whose default differs here from TrainConfig's


def parser() -> argparse.ArgumentParser:
    """The recipe's flags, with its own defaults."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_model_args(p)
    g = p.add_argument_group("DreamBooth")
    g.add_argument("--instance_data_dir", required=True,
                   help="folder with the subject's photos; those in an N_name sub-folder count N times (kohya)")
    g.add_argument("--instance_prompt", required=True, help="e.g. 'a photo of sks dog'")
    g.add_argument("--instance_captions", action="store_true",
                   help="give each photo its own prompt: its --caption_column in the folder's metadata.jsonl/.csv, "
                        "or its same-name --caption_extension file (kohya); photos without one get --instance_prompt "
                        "(in a kohya N_name folder, the folder's name, as kohya does). "
                        "Name what is not the subject (\"a photo of sks dog on a beach\") so the identifier "
                        "learns the subject alone, not its backgrounds")
    g.add_argument("--caption_column", default="text", help="with --instance_captions (default: %(default)s)")
    g.add_argument("--caption_extension", default=".txt", help="with --instance_captions (default: %(default)s)")
    g.add_argument("--class_data_dir", default=None, help="default: <output_dir>-class-images, beside the output")
    g.add_argument("--class_prompt", default=None, help="e.g. 'a photo of a dog'")
    g.add_argument("--with_prior_preservation", action="store_true",
                   help="also train on images of the class (--class_prompt), made by the base model if missing, so "
                        "the model keeps what the class looks like")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="the class images' loss weight")
    g.add_argument("--num_class_images", type=int, default=100,
                   help="class images to train with; missing ones are generated")
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size for generating class images")
    g.add_argument("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"],
                   help="default: fp16 on a GPU, bf16 on a CPU with native bf16, fp32 otherwise")
    flags.add_settings(g, "pre_compute_text_embeddings", "tokenizer_max_length", "text_encoder_use_attention_mask")
    g.add_argument("--validation_images", nargs="+", default=None,
                   help="image inputs for image-conditioned pipelines; not used by SD1.x text-to-image")
    g.add_argument("--repeats", type=int, default=1,
                   help="how often each instance image appears per epoch (times its N_name folder's N)")
    flags.add_settings(g, "text_encoder_lr")
    flags.add_training_args(p)
    configfile.add_args(p)
    flags.set_defaults(p, DEFAULTS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return configfile.parse(parser(), argv, "dreambooth", f"{SCRIPT}.py")


def check_flags(args):
    """DreamBooth's contradictions, before anything is loaded."""
    if args.with_prior_preservation:
        if not args.class_prompt:
            raise UserError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of a dog')")
        if args.num_class_images < 1:
            raise UserError(f"--num_class_images must be >= 1 with prior preservation (got {args.num_class_images})")
    if args.train_text_encoder and args.pre_compute_text_embeddings:
        raise UserError("--pre_compute_text_embeddings freezes the text encoder; it can't be used with "
                        "--train_text_encoder")
    ops = flags.caption_ops(args)
    if ops and ops.varies and args.pre_compute_text_embeddings:
        raise UserError("--pre_compute_text_embeddings encodes each prompt once; it can't be used with "
                        "--shuffle_caption or --caption_tag_dropout_rate, which change the prompt every step")
    if args.validation_images:
        raise UserError("--validation_images is for image-conditioned pipelines (e.g. DeepFloyd IF upscalers); "
                        "SD1.x validation is text-to-image: use --validation_prompt")
    if args.repeats < 1 or args.sample_batch_size < 1:
        raise UserError("--repeats and --sample_batch_size must be >= 1")
    for flag in ("instance_prompt", "class_prompt"):
        check_caption(getattr(args, flag) or "", f"--{flag}")
    warning = class_images.identifier_warning(args.instance_prompt, args.class_prompt)
    if warning:
        log.warning(warning)
    return ops


def class_rows(args, config: TrainConfig):
    """Class images for prior preservation, topped up from the base model by the main process."""
    import torch
    from accelerate import PartialState

    out = config.output_dir
    folder = Path(args.class_data_dir) if args.class_data_dir else out.parent / f"{out.name}-class-images"
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:
        Manifest(out).will_make(folder)  # the UI's <output>/class-images: sdlora's when this run makes it
        precision = args.prior_generation_precision or fast_precision(state.device)
        interrupt.entered("class images")  # a stop here ends the run at once; the images made so far stay
        class_images.generate(config.base, folder, args.class_prompt, args.num_class_images, config.resolution,
                              args.sample_batch_size, args.seed or 0, torch_dtype(precision), state.device,
                              revision=config.revision, variant=config.variant, cache_dir=config.cache_dir,
                              allow_pickle=config.allow_pickle, base_config=config.base_config)
        interrupt.entered("start")
    state.wait_for_everyone()
    rows = rows_from_images(folder, args.class_prompt, "--class_data_dir", kohya_repeats=False)
    return rows[: args.num_class_images], folder


def rows(args: argparse.Namespace) -> list[Row]:
    """The subject's photos in --instance_data_dir with the prompts they train on (the class images are made or
    read when the run starts: `class_rows`)."""
    return instance_rows(args, Path(args.instance_data_dir), DATA_FLAG)


def instance_rows(args: argparse.Namespace, folder: Path, what: str) -> list[Row]:
    """The subject's photos in `folder` (named `what` in messages): all with --instance_prompt, or with
    --instance_captions each with its own caption (--instance_prompt where it has none)."""
    if not args.instance_captions:
        return rows_from_images(folder, args.instance_prompt, what)
    rows = rows_from_folder(folder, args.caption_column, allow_empty_captions=True, what=what,
                            caption_extension=args.caption_extension)
    if not any(r.caption for r in rows):
        log.warning("--instance_captions: no photo in %s has a caption of its own (a metadata.jsonl/.csv with a %r "
                    "column, or same-name %s files, in that folder); every photo gets --instance_prompt", folder,
                    args.caption_column, args.caption_extension)
    rows = [replace(r, caption=r.caption or args.instance_prompt) for r in rows]
    # the identifier is the word before the class word, which only a --class_prompt pins down
    word = class_images.identifier(args.instance_prompt, args.class_prompt)[0] if args.class_prompt else ""

    def names_it(caption) -> bool:
        texts = caption if isinstance(caption, list) else [caption]
        return any(word in re.findall(r"\w+", t.lower()) for t in texts)
    lacking = [r for r in rows if word and not names_it(r.caption)]
    if lacking:
        log.warning("%d of %d captions in %s lack the identifier %r (e.g. %s: %r); those photos teach the base "
                    "model's words, not the subject", len(lacking), len(rows), what, word, Path(lacking[0].name).name,
                    lacking[0].caption)
    return rows


def make_recipe(args, config: TrainConfig) -> Recipe:
    ops = check_flags(args)
    instance = rows(args)
    instance, held = split_heldout(instance, config.validation_split)
    if config.validation_data_dir:
        held = instance_rows(args, config.validation_data_dir, "--validation_data_dir")
    if config.masked_loss:  # the subject's photos only: class images are learned whole
        masks.attach(instance + held, config.mask_dir, [Path(args.instance_data_dir), config.validation_data_dir])
    captions.check_keep_tokens(ops, instance)
    both, groups = list(instance), [0] * len(instance)
    # Each row as often as its N_name folder says; that list --repeats times over (0, 1, 2, 0, 1, 2 for N = 1).
    inst = [i for i, r in enumerate(instance) for _ in range(r.repeats)] * args.repeats
    n = len(inst)
    examples = [[i] for i in inst]
    card = {"instance prompt": args.instance_prompt, "class prompt": args.class_prompt,
            "prior preservation": bool(args.with_prior_preservation), "repeats": args.repeats,
            "instance captions": bool(args.instance_captions)}
    if args.with_prior_preservation:
        cls, folder = class_rows(args, config)
        both += cls
        groups += [1] * len(cls)
        # Each example pairs an instance row with a class row, as diffusers' DreamBooth dataset does.
        n = max(n, len(cls))
        examples = [[inst[i % len(inst)], len(instance) + i % len(cls)] for i in range(n)]
        card.update({"prior loss weight": args.prior_loss_weight, "class images": f"{len(cls)} in {folder.name}"})
    data = TrainSet(both, examples, groups, config.resolution, config.center_crop, config.random_flip,
                    config.bucketing, captions=ops)
    return Recipe(kind="dreambooth", data=data, dataset_desc=dataset_label(args.instance_data_dir),
                  heldout=heldout_set(held, config.resolution, config.bucketing),
                  group_weights={0: 1.0, 1: args.prior_loss_weight}, group_names={0: "loss_instance", 1: "loss_prior"},
                  card_front={"instance_prompt": args.instance_prompt}, card_settings=card,
                  max_length=args.tokenizer_max_length, use_attention_mask=args.text_encoder_use_attention_mask,
                  extra_tags=["dreambooth"], trigger_phrase=args.instance_prompt)


def main(argv=None, **hooks) -> int:
    """The script: parse `argv` (default: the command line), check, train; the exit status. `hooks` go to
    `cli.run.run` (`on_start`, `on_step`, `should_stop`, …; the UI uses them)."""
    args = parse_args(argv)
    return run(args, make_recipe, settings=configfile.run_settings(parser(), args, f"{SCRIPT}.py"), **hooks)
