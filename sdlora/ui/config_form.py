"""The Train tab's form as a config file and back: Save / Load config (the TOML the scripts read with
--config_file), the preset picker, and the form restored on a reload from the run it shows (its launched flags, or
its folder's own `sdlora-config.toml`). No Gradio here: values in, values out (train_tab.py wires them)."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..errors import UserError
from ..io import write_bytes
from ..recipes import RECIPES, configfile, presets
from ..training.optimizers import KINDS, kind_of
from ..training.runconfig import NAME as RUN_CONFIG

# The form's own fields besides the main flags (train_tab.MAIN_FLAGS) and the labelled advanced ones (ADVANCED).
FIELDS = ("recipe", "base", "base_config", "data_dir", "instance_prompt", "output_dir", "lora_type", "mixed_precision",
          "extra")
# Advanced settings shown as labelled fields: flag -> label (a setting more is one entry here and one in
# resolved_defaults; the form reads them generically).
ADVANCED = {"lr_scheduler": "LR schedule", "lora_alpha": "LoRA alpha", "text_encoder_lr": "Text-encoder LR",
            "clip_skip": "Clip skip", "loraplus_lr_ratio": "LoRA+ LR ratio",
            "optimizer_args": "Optimizer arguments", "ema_decay": "EMA decay"}
# ADVANCED fields that hold several values (nargs="*"), written as shell words: "d_coef=2 decouple=False".
LISTS = {"optimizer_args"}
OPTIMIZERS = [k.name for k in KINDS.values()]  # the optimizer field -> --optimizer (AdamW: the default, no flag)
# After the optimizer: the EMA checkbox (--use_ema), then the dataset-config file.
# Flags the form holds in fields of their own (never repeated under "more flags").
OWN = {"pretrained_model_name_or_path", "base_config", "train_data_dir", "instance_data_dir", "instance_prompt",
       "output_dir", "lora_type", "mixed_precision", "use_8bit_adam", "optimizer", "use_ema", "dataset_config",
       "sample_prompts", *ADVANCED}


def form_values(recipe: str, args: argparse.Namespace, main_flags: list[str]) -> list:
    """The form's values for parsed recipe flags, in the order FIELDS, main flags, ADVANCED, optimizer, EMA,
    dataset config. Every flag the fields don't hold and whose value differs from the recipe's default goes to "more
    flags"."""
    p = RECIPES[recipe].parser()
    data_flag = RECIPES[recipe].DATA_FLAG.removeprefix("--")
    extra = []
    for a in p._actions:
        if not a.option_strings or a.dest in OWN or a.dest in main_flags or a.dest in configfile.NOT_SAVED:
            continue
        v = getattr(args, a.dest, None)
        if v is None or v == p.get_default(a.dest) or v is False:
            continue
        flag = a.option_strings[0]
        extra += [flag] if a.nargs == 0 else [flag, *map(str, v)] if isinstance(v, list) else [flag, str(v)]
    shown = [recipe, args.pretrained_model_name_or_path or "", getattr(args, "base_config", None) or "",
             getattr(args, data_flag, None) or "",
             getattr(args, "instance_prompt", None) or "", args.output_dir or "", args.lora_type,
             args.mixed_precision or "default", shlex.join(extra)]
    shown += [_text(getattr(args, n, None)) for n in main_flags]
    shown += [_text(getattr(args, n, None)) for n in ADVANCED]
    shown += [kind_of(getattr(args, "optimizer", None), bool(args.use_8bit_adam)).name,
              bool(getattr(args, "use_ema", False)), getattr(args, "dataset_config", None) or ""]
    return shown


def _text(v) -> str:
    if isinstance(v, (list, tuple)):
        return shlex.join(map(str, v))
    return "" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def advanced_flags(*values) -> list[str]:
    """The advanced fields (ADVANCED's, then the optimizer and the EMA checkbox) as flags; blank ones are left to
    the recipe. A LISTS field's text is split as the shell splits it, one value a word."""
    *named, optimizer, use_ema = values
    flags = []
    for name, v in zip(ADVANCED, named):
        text = str(v or "").strip()
        if text:
            flags += [f"--{name}", *(_words(name, text) if name in LISTS else [text])]
    flags += ["--optimizer", optimizer] if optimizer and optimizer != "AdamW" else []
    return flags + (["--use_ema"] if use_ema else [])


def _words(name: str, text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise UserError(f"{ADVANCED[name]} (--{name}): {e}; check the quotes") from None


def resolved_defaults(recipe: str) -> dict:
    """What each advanced field means when left blank: the recipe's default, or how it is worked out."""
    p = RECIPES[recipe].parser()
    return {"lr_scheduler": p.get_default("lr_scheduler"), "lora_alpha": "= rank (scale 1)",
            "text_encoder_lr": "= learning rate", "clip_skip": "1: the last layer (SD 1.x/2.x)",
            "loraplus_lr_ratio": "off (LoRA+: B's rate = ratio x A's)",
            "optimizer_args": "key=value ..., e.g. Prodigy's d_coef=2 decouple=False",
            "ema_decay": f"{p.get_default('ema_decay'):g} (with EMA on)"}


def load(path: str, recipe: str, main_flags: list[str]) -> list:
    """A config file (or, given a preset's name, that preset) as the form's values; its recipe is the preset's
    own, else `recipe`. The recipe's parser checks it, with the data fields allowed blank."""
    path = str(path or "").strip()
    if not path:
        raise UserError("config file: give a TOML file's path (or pick a preset)")
    if path in presets.names():
        recipe, flags = presets.about(path)["recipe"], ["--preset", path]
    else:
        flags = ["--config_file", path]
    return form_values(recipe, _parse(recipe, flags), main_flags)


def _parse(recipe: str, flags: list[str]) -> argparse.Namespace:
    """The recipe's parse_args on `flags`, a usage error a UserError; required flags the file lacks stay blank."""
    p = RECIPES[recipe].parser()
    for a in p._actions:
        a.required = False
    p.error = _raise
    return configfile.parse(p, flags, recipe)


def _raise(message: str):
    raise UserError(message)


def save(path: str, recipe: str, flags: list[str]) -> str:
    """The form's flags (checked) written as a config file at `path`, never over a file that exists."""
    path = str(path or "").strip()
    if not path:
        raise UserError("config file: give the path to save the TOML to")
    target = Path(path).expanduser()
    if target.exists():
        raise UserError(f"config file {target}: already exists; choose a new name (nothing is written over a file)")
    p = RECIPES[recipe].parser()
    args = _parse(recipe, flags)
    write_bytes(target, configfile.dumps(p, args, f"{RECIPES[recipe].SCRIPT}.py").encode("utf-8"), replace=False)
    return f"saved {target}: `sdlora train {recipe} --config_file {target}` runs it"


def restore(recipe_flags: tuple[str, list[str]] | None, folder: Path | None, main_flags: list[str]) -> list | None:
    """The form of the run a reopened page shows: the flags this UI launched it with, else its folder's saved
    settings; None when there is neither."""
    if recipe_flags:
        recipe, flags = recipe_flags
        if "--resume_from_checkpoint" in flags:  # Resume's own: the form is the run's settings
            at = flags.index("--resume_from_checkpoint")
            flags = flags[:at] + flags[at + 2:]
        return form_values(recipe, _parse(recipe, flags), main_flags)
    saved = folder / RUN_CONFIG if folder else None
    if saved and saved.is_file():
        for recipe, mod in RECIPES.items():
            text = saved.read_text(encoding="utf-8", errors="replace")
            if text.startswith(f"# {mod.SCRIPT}.py"):
                return form_values(recipe, _parse(recipe, ["--config_file", str(saved)]), main_flags)
    return None
