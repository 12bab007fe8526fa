"""`sdlora train text-to-image|dreambooth …`: the recipes (sdlora/recipes) run from an installed package."""
from __future__ import annotations

import argparse

from ..recipes import RECIPES


def _train_cli(args):
    """`sdlora train RECIPE FLAGS…`: the recipe module's own `main`, so flags and behaviour are the script's."""
    return RECIPES[args.recipe].main(args.flags)


def register(sub):
    s = sub.add_parser("train", help="train a LoRA (same flags as train_text_to_image_lora.py / train_dreambooth_lora.py)",
                       description="Run a training recipe; `sdlora train text-to-image --help` lists its flags.")
    s.add_argument("recipe", choices=list(RECIPES))
    s.add_argument("flags", nargs=argparse.REMAINDER, help="the recipe's flags")
    s.set_defaults(func=_train_cli)
