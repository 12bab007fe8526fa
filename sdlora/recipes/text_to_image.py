"""Train a Stable Diffusion LoRA on image–caption pairs.

Same flags as diffusers' examples/text_to_image/train_text_to_image_lora.py, plus
--train_text_encoder, --lora_alpha, --target_modules, --save_precision and --no_cache.

    python train_text_to_image_lora.py --pretrained_model_name_or_path sdlora-tiny \
        --train_data_dir examples/data/pokemon_style --resolution 32 --output_dir out

Reads top to bottom: flags -> data -> the shared training loop (sdlora/training/loop.py).
Also installed with the package: `sdlora train text-to-image …` runs this file's `main`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import flags
from ..cli.parser import Parser
from ..cli.run import run
from . import configfile
from ..data import captions, datasetconfig, masks
from ..data.sources import Row, dataset_label, rows_from_datasets, rows_from_folder, split_heldout
from ..data.trainset import TrainSet, heldout_set
from ..errors import UserError
from ..training.config import TrainConfig
from ..training.run import Recipe

SCRIPT = "train_text_to_image_lora"  # the top-level script that runs `main` (the UI names runs by it)
DATA_FLAG = "--train_data_dir"
# Settings whose default differs here from TrainConfig's (batch 1, its default, fits 11 GB-class GPUs at 512 px).
DEFAULTS = {"output_dir": "sd-model-finetuned-lora", "num_train_epochs": 100}


def parser() -> argparse.ArgumentParser:
    """The recipe's flags, with its own defaults."""
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="a `datasets` id or a local dataset folder")
    g.add_argument("--dataset_config_name", default=None, help="the `datasets` configuration of --dataset_name")
    g.add_argument("--train_data_dir", default=None,
                   help="folder of images with metadata.jsonl/metadata.csv, or with same-name .txt captions; "
                        "images in an N_name sub-folder count N times per epoch (kohya)")
    g.add_argument("--caption_extension", default=".txt",
                   help="the same-name caption files' extension in --train_data_dir, e.g. .caption")
    g.add_argument("--image_column", default="image", help="--dataset_name's image column (default: %(default)s)")
    g.add_argument("--caption_column", default="text",
                   help="the caption column of --dataset_name or of the folder's metadata.jsonl/.csv "
                        "(default: %(default)s)")
    g.add_argument("--max_train_samples", type=int, default=None, help="train on the first N images only")
    g.add_argument("--allow_empty_captions", action="store_true", help="train on images that have no caption")
    g.add_argument("--dataset_config", metavar="FILE.toml",
                   help="kohya's dataset TOML ([general], [[datasets]], [[datasets.subsets]]): several folders, each with "
                        "its own repeats, captions and is_reg, per-dataset resolution (see docs/config-files.md); "
                        "instead of --train_data_dir")
    g.add_argument("--prior_loss_weight", type=float, default=1.0,
                   help="the loss weight of --dataset_config's is_reg (regularisation) subsets")
    flags.add_settings(g, "text_encoder_lr")
    flags.add_training_args(p)
    configfile.add_args(p)
    flags.set_defaults(p, DEFAULTS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed flags; a usage error (one line, exit status 2) when they name no data or two sources."""
    p = parser()
    args = configfile.parse(p, argv, "text-to-image", f"{SCRIPT}.py")
    if sum(x is not None for x in (args.dataset_name, args.train_data_dir, args.dataset_config)) != 1:
        p.error("give exactly one of --dataset_name, --train_data_dir or --dataset_config")
    if args.dataset_config:
        try:  # kohya: the datasets' batch_size wins over --train_batch_size
            args.train_batch_size = datasetconfig.batch_size(args.dataset_config) or args.train_batch_size
        except UserError as e:
            p.error(str(e))
    return args


def rows(args: argparse.Namespace) -> list[Row]:
    """The training images with their captions, as the run reads them (before any are held out): the folder's or
    the data set's, the first --max_train_samples of them."""
    if args.train_data_dir:
        found = rows_from_folder(Path(args.train_data_dir), args.caption_column, args.allow_empty_captions,
                                 caption_extension=args.caption_extension)
    else:
        found = rows_from_datasets(args.dataset_name, args.dataset_config_name, args.image_column,
                                   args.caption_column, args.cache_dir, args.allow_empty_captions)
    if args.max_train_samples is not None:
        if args.max_train_samples < 1:
            raise UserError("--max_train_samples must be >= 1")
        found = found[: args.max_train_samples]
    return found


def make_recipe(args: argparse.Namespace, config: TrainConfig) -> Recipe:
    """Text-to-image: every row is an example (N of them from an N_name folder) in the single loss group."""
    ops = flags.caption_ops(args)
    if args.dataset_config:
        return from_dataset_config(args, config, ops)
    train = rows(args)
    desc = dataset_label(args.train_data_dir or args.dataset_name)
    captions.check_keep_tokens(ops, train)
    train, held = split_heldout(train, config.validation_split)
    if config.validation_data_dir:
        held = rows_from_folder(config.validation_data_dir, args.caption_column, args.allow_empty_captions,
                                what="--validation_data_dir", caption_extension=args.caption_extension)
    if config.masked_loss:
        masks.attach(train + held, config.mask_dir,
                     [args.train_data_dir and Path(args.train_data_dir), config.validation_data_dir])
    examples = [[i] for i, r in enumerate(train) for _ in range(r.repeats)]
    data = TrainSet(train, examples, [0] * len(train), config.resolution, config.center_crop, config.random_flip,
                    config.bucketing, captions=ops)
    return Recipe(kind="text-to-image", data=data, dataset_desc=desc,
                  heldout=heldout_set(held, config.resolution, config.bucketing))


def from_dataset_config(args: argparse.Namespace, config: TrainConfig, ops) -> Recipe:
    """The recipe of a --dataset_config: its subsets' rows (is_reg ones in loss group 1), each dataset's sizing."""
    if config.validation_split or config.mask_dir:
        raise UserError("--dataset_config: --validation_split and --mask_dir are not read with it; use "
                        "--validation_data_dir, and alpha_mask = true in a subset")
    b = config.bucketing
    fallback = {"caption_extension": args.caption_extension, "shuffle_caption": args.shuffle_caption,
                "keep_tokens": args.keep_tokens, "keep_tokens_separator": args.keep_tokens_separator,
                "caption_dropout_rate": args.caption_dropout_rate, "caption_separator": args.caption_separator,
                "caption_tag_dropout_rate": args.caption_tag_dropout_rate, "flip_aug": config.random_flip,
                "alpha_mask": config.masked_loss, "resolution": config.resolution,
                "batch_size": config.train_batch_size, "enable_bucket": b.enabled, "min_bucket_reso": b.min_reso,
                "max_bucket_reso": b.max_reso, "bucket_reso_steps": b.step, "bucket_no_upscale": b.no_upscale}
    got = datasetconfig.layout(datasetconfig.read(args.dataset_config, fallback), args.caption_column,
                               args.allow_empty_captions)
    held = []
    if config.validation_data_dir:
        held = rows_from_folder(config.validation_data_dir, args.caption_column, args.allow_empty_captions,
                                what="--validation_data_dir", caption_extension=args.caption_extension)
    data = TrainSet(got.rows, got.examples, got.groups, config.resolution, config.center_crop, False, b,
                    captions=ops, parts=got.parts, row_parts=got.row_parts)
    reg = 1 in got.groups
    return Recipe(kind="text-to-image", data=data, dataset_desc=dataset_label(args.dataset_config),
                  heldout=heldout_set(held, config.resolution, b),
                  group_weights={0: 1.0, 1: args.prior_loss_weight} if reg else {0: 1.0},
                  group_names={0: "loss", 1: "loss_reg"} if reg else {0: "loss"})


def main(argv=None, **hooks) -> int:
    """The script: parse `argv` (default: the command line), check, train; the exit status. `hooks` go to
    `cli.run.run` (`on_start`, `on_step`, `should_stop`, …; the UI uses them)."""
    args = parse_args(argv)
    return run(args, make_recipe, settings=configfile.run_settings(parser(), args, f"{SCRIPT}.py"), **hooks)
