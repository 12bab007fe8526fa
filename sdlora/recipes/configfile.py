"""A recipe's settings from TOML files: `--config_file FILE.toml` (keys are flag names; kohya's section tables such
as [training_arguments] are flattened, as sd-scripts does, and kohya's own names mapped: kohya.py), `--preset NAME`
(a shipped file, presets.py), and on `--resume_from_checkpoint` the run folder's own resolved settings
(`sdlora-config.toml`). Layers, lowest first: the folder's settings, the preset, the config file, the command line.

Each file value becomes the command-line words it stands for (`rank = 8` -> `--rank=8`) and is checked with the
flag's own type and choices first, so a bad one is one line naming the key and the file. `--output_config` writes
every flag's resolved value (defaults included) and exits; every run writes the same into its output folder.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import sys
from pathlib import Path

from .. import tomlfile
from ..errors import UserError
from ..training.runconfig import NAME as RUN_CONFIG
from . import kohya, presets

# Flags that are no setting of a run: never read from, nor written into, a config file.
NOT_SAVED = {"help", "config_file", "output_config", "preset", "hub_token", "local_rank", "resume_from_checkpoint"}


def add_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("config files", "TOML files of flags (see docs/config-files.md); flags given on the "
                             "command line win")
    g.add_argument("--config_file", metavar="FILE.toml",
                   help="read flags from this TOML file: keys are flag names (kohya's sd-scripts files too: their "
                        "[sections] are flattened, their names mapped)")
    g.add_argument("--preset", metavar="NAME", help="start from a shipped preset (`sdlora presets` lists them); "
                                                    "--config_file and flags override it")
    g.add_argument("--output_config", nargs="?", const=True, metavar="FILE.toml",
                   help="write every flag's resolved value (defaults included) as TOML to FILE (kohya: bare, to "
                        "--config_file's path, which is then not read; neither: standard output) and exit")


def _pre_parser() -> argparse.ArgumentParser:
    """Just the flags that say which files to read, from a command line holding any others."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("config_file", "preset", "resume_from_checkpoint", "output_dir"):
        pre.add_argument(f"--{flag}")
    pre.add_argument("--output_config", nargs="?", const=True)
    return pre


def parse(p: argparse.ArgumentParser, argv=None, recipe: str = "", script: str = "") -> argparse.Namespace:
    """`p.parse_args` over the files' settings and then `argv`; a bad file is a usage error (one line). `script`:
    the recipe's script, named in what --output_config writes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _pre_parser().parse_known_args(argv)[0]
    try:
        merged = file_values(p, pre, recipe)
        args = p.parse_args(to_argv(p, merged) + argv)
    except UserError as e:
        p.error(str(e))
    if pre.output_config:
        _output_config(p, args, pre, script or p.prog)
    return args


def file_values(p: argparse.ArgumentParser, pre, recipe: str) -> dict:
    """The settings the files give (dest -> value, checked), layered: the run folder's, the preset's, the file's."""
    layers = {}
    if pre.preset:
        if (made_for := presets.about(pre.preset)["recipe"]) != recipe:
            raise UserError(f"--preset {pre.preset} is for `sdlora train {made_for}`, not {recipe}")
        layers.update(read(p, presets.path(pre.preset), "--preset", recipe))
    if pre.config_file and pre.output_config is not True:
        layers.update(read(p, pre.config_file, "--config_file", recipe))
    if pre.resume_from_checkpoint:
        folder = run_folder(pre.resume_from_checkpoint, pre.output_dir or layers.get("output_dir"))
        saved = folder / RUN_CONFIG if folder else None
        if saved and saved.is_file():
            layers = {**_gone_prompts(read(p, saved, "--resume_from_checkpoint: the run's settings", recipe)),
                      **layers}
    return layers


SAMPLING = ("sample_prompts", "sample_every_n_steps", "sample_every_n_epochs", "sample_at_first")


def _gone_prompts(values: dict) -> dict:
    """A run's settings without a sample-prompts file that is gone (the web UI's prompts live in a temporary file):
    the resume samples nothing rather than failing; said in one warning."""
    prompts = values.get("sample_prompts")
    if prompts and not Path(prompts).exists():
        logging.getLogger("sdlora").warning("the run's --sample_prompts %s is gone: resuming without sample prompts "
                                            "(give --sample_prompts FILE to sample)", prompts)
        return {k: v for k, v in values.items() if k not in SAMPLING}
    return values


def run_folder(resume: str, output_dir) -> Path | None:
    """The output folder a --resume_from_checkpoint continues: a checkpoint path's parent, else --output_dir."""
    ckpt = Path(resume).expanduser()
    if resume != "latest" and ckpt.name.startswith("checkpoint-"):
        return ckpt.parent
    return Path(output_dir).expanduser() if output_dir else None


def flatten(table: dict, where: str) -> dict:
    """kohya's layout: top-level keys, and the keys of each [section] as if top-level (a key in two places, or a
    table nested deeper, is one line)."""
    flat = {}
    for key, v in table.items():
        items = v.items() if isinstance(v, dict) else [(key, v)]
        for k, value in items:
            if isinstance(value, dict):
                raise UserError(f"{where}: [{key}.{k}]: tables nest one level ([section] of flags)")
            if k in flat:
                raise UserError(f"{where}: {k} is set twice (sections are flattened, as kohya's sd-scripts does)")
            flat[k] = value
    return flat


def read(p: argparse.ArgumentParser, path, what: str, recipe: str) -> dict:
    """A TOML file's settings as {dest: value}, kohya's names mapped, each value checked as its flag checks it;
    `what` names the file's source in messages (the flag)."""
    where = f"{what} {path}"
    actions = {a.dest: a for a in p._actions if a.option_strings}
    values = kohya.translate(flatten(tomlfile.read(path, what), where), where, recipe, frozenset(actions))
    values = kohya.output_name(values, where)
    out = {}
    for key, v in values.items():
        action = actions.get(key)
        if action is None or key in NOT_SAVED:
            near = difflib.get_close_matches(key, [d for d in actions if d not in NOT_SAVED], n=1)
            raise UserError(f"{where}: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else "") +
                            " (keys are the flag names that --help lists)")
        out[key] = check_value(action, key, v, where)
    return out


def check_value(action: argparse.Action, key: str, v, where: str):
    """`v` as its flag would take it (a comma-separated list flag also takes a TOML list); a wrong type or a value
    outside the choices is one line."""
    switch = action.nargs == 0
    if isinstance(v, bool) and not switch and _takes_words(action):  # a true/false-word flag (--prodigy_decouple)
        v = str(v)
    if switch != isinstance(v, bool):
        raise UserError(f"{where}: {key} = {tomlfile.value(v) if not isinstance(v, dict) else '{…}'}: "
                        + ("true or false" if switch else "a value, not true/false") + f" (as --{key})")
    if switch:
        return v
    many = action.nargs in ("+", "*")
    items = v if isinstance(v, list) else [v]
    if isinstance(v, list) and not many:
        if not all(isinstance(x, str) for x in v):
            raise UserError(f"{where}: {key}: a list of strings, or one value")
        items = [",".join(v)]  # the comma-separated list flags (--target_modules)
    for x in items:
        if isinstance(x, (dict, list, bool)):
            raise UserError(f"{where}: {key}: {type(x).__name__} where --{key} takes a value")
        try:
            checked = action.type(str(x)) if action.type else str(x)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise UserError(f"{where}: {key} = {tomlfile.value(x)}: not a valid {action.type.__name__} "
                            f"(as --{key})") from None
        if action.choices is not None and checked not in action.choices:
            raise UserError(f"{where}: {key} = {tomlfile.value(x)}: one of {', '.join(map(str, action.choices))}")
    return items if many else items[0]


def _takes_words(action: argparse.Action) -> bool:
    """Whether a flag that takes a value takes true/false as words (a setting on by default)."""
    try:
        return action.type is not None and isinstance(action.type("true"), bool)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        return False


def to_argv(p: argparse.ArgumentParser, values: dict) -> list[str]:
    """The command-line words that give `values` (dest -> checked value), to put before the command line's own."""
    actions = {a.dest: a for a in p._actions if a.option_strings}
    words = []
    for key, v in values.items():
        flag = actions[key].option_strings[0]
        if actions[key].nargs == 0:
            words += [flag] if v else []
        elif isinstance(v, list):
            words += [flag, *map(str, v)]
        else:
            words.append(f"{flag}={v}")  # `=`: a value that starts with '-' stays a value
    return words


def resolved(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Every flag's value in `args` (defaults included; unset ones, TOML having no null, left out), in --help's
    order, the way a config file writes it."""
    out = {}
    for a in p._actions:
        if not a.option_strings or a.dest in NOT_SAVED or a.dest in out:
            continue
        v = getattr(args, a.dest, None)
        if v is None:
            continue
        out[a.dest] = [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v) if isinstance(v, Path) else v
    return out


def comments(p: argparse.ArgumentParser) -> dict:
    """Each flag's help as the comment above its key."""
    return {a.dest: (a.help or "").replace("%(default)s", str(a.default)).replace("%%", "%")
            for a in p._actions if a.option_strings}


# Flags naming local files or folders: absolute in a run folder's own settings, so a resume from elsewhere finds them.
PATHS = ("output_dir", "train_data_dir", "instance_data_dir", "class_data_dir", "mask_dir", "validation_data_dir",
         "sample_prompts", "latents_cache_dir", "cache_dir", "pretrained_model_name_or_path", "dataset_config",
         "pretrained_vae_model_name_or_path", "dataset_name")


def run_settings(p: argparse.ArgumentParser, args: argparse.Namespace, script: str) -> str:
    """The TOML a run writes into its folder: `dumps`, with local paths made absolute."""
    values = dict(vars(args))
    for k in PATHS:
        v = values.get(k)
        if isinstance(v, str) and (k == "output_dir" or Path(v).expanduser().exists()):
            values[k] = str(Path(v).expanduser().absolute())
    return dumps(p, argparse.Namespace(**values), script)


def dumps(p: argparse.ArgumentParser, args: argparse.Namespace, script: str) -> str:
    return tomlfile.dumps(resolved(p, args), comments(p),
                          header=f"{script} settings, every flag (defaults included); read it back with\n"
                                 f"--config_file, or resume the run from its folder (flags given beside it win)")


def _output_config(p: argparse.ArgumentParser, args: argparse.Namespace, pre, script: str):
    """--output_config: the file (never over an existing one), or standard output; then exit."""
    target = pre.output_config if pre.output_config is not True else pre.config_file
    text = dumps(p, args, script)
    if not target:
        sys.stdout.write(text)
        p.exit(0)
    from ..io import write_bytes

    if Path(target).exists():
        p.error(f"--output_config {target}: already exists; choose a new file name (nothing is written over a file)")
    try:
        write_bytes(Path(target), text.encode("utf-8"), replace=False)
    except OSError as e:
        p.error(f"--output_config {target}: cannot write ({e.strerror or e})")
    p.exit(0, f"wrote {target}\n")
