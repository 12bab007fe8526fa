"""The --sample_prompts file: one prompt per line, with kohya sd-scripts' inline options.

    # comments and blank lines are skipped
    a cat on a sofa --n blurry, lowres --w 512 --h 768 --d 42 --l 7 --s 28

As in sd-scripts, options start at " --" (a space, then two dashes) and are case-insensitive, so
"a--b" or "well-lit" stay prompt text. Unlike sd-scripts, an option sdlora does not know, or a
value that is not a number, is an error rather than silently ignored: a typo would otherwise
sample something else than the user asked for, for the whole run.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

DEFAULT_STEPS = 20  # sd-scripts uses 30; DPM++ (what sdlora samples with) converges in 20
DEFAULT_GUIDANCE = 7.5
MAX_STEPS = 1000  # a noise schedule has 1000 timesteps; sd-scripts clamps to the same
OPTIONS = {"n": "negative", "w": "width", "h": "height", "s": "steps", "l": "guidance", "d": "seed"}
HELP = "--n negative prompt, --w width, --h height, --s steps, --l guidance scale, --d seed"


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int | None = None  # None: the run's seed + this prompt's index, the same in every round


def read(path, resolution: int, multiple: int = 8) -> tuple[SamplePrompt, ...]:
    """The prompts of a --sample_prompts file, or a one-line UserError naming the file (and line). `multiple`:
    what a side must be a multiple of for the base (models.sample_multiple: 8 for every SD VAE)."""
    path = Path(path)
    if path.suffix.lower() in (".json", ".toml"):
        raise UserError(f"--sample_prompts {path}: only the text format is read (one prompt per line, with "
                        f"options such as --n, --w, --h); write the prompts into a .txt file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"--sample_prompts {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--sample_prompts {path}: a folder, not a text file with one prompt per line") from None
    except OSError as e:
        raise UserError(f"--sample_prompts {path}: can't read it ({e.strerror}); check its permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text; save it as UTF-8") from None
    prompts = tuple(parse_line(line, resolution, f"{path}, line {n}", multiple)
                    for n, line in enumerate(text.splitlines(), 1) if not _skipped(line))
    if not prompts:
        raise UserError(f"--sample_prompts {path}: no prompts in it (blank lines and lines starting with # are "
                        f"skipped); write one prompt per line")
    return prompts


def _skipped(line: str) -> bool:
    # sd-scripts only skips a '#' in the first column; an indented comment is no prompt either
    return not line.strip() or line.strip().startswith("#")


def parse_line(line: str, resolution: int, where: str = "prompt", multiple: int = 8) -> SamplePrompt:
    """'a cat --n blurry --w 512 …' -> SamplePrompt; width and height default to `resolution`, and are multiples
    of `multiple`."""
    prompt, *options = (" " + line.strip()).split(" --")  # a line that starts with an option has no prompt
    prompt = prompt.strip()
    if not prompt:
        raise UserError(f"{where}: no prompt before the options; start the line with the prompt")
    given: dict = {}
    for option in options:
        name, _, value = option.partition(" ")
        key, value = OPTIONS.get(name.lower()), value.strip()
        if key is None:
            raise UserError(f"{where}: unknown option '--{name}' (the options are {HELP}); inside a prompt, "
                            f"write '--' without a space before it")
        if key in given:
            raise UserError(f"{where}: --{name} is given twice; keep one")
        if not value:
            raise UserError(f"{where}: --{name} needs a value, e.g. --{name} {_EXAMPLE[key]}")
        given[key] = value if key == "negative" else _number(key, name, value, where, multiple)
    if resolution % multiple and not ("width" in given and "height" in given):
        raise UserError(f"{where}: samples at --resolution {resolution} without --w and --h, but this base's images "
                        f"are drawn in multiples of {multiple}; give --w and --h")
    return SamplePrompt(prompt=prompt, **{"width": resolution, "height": resolution, **given})


_EXAMPLE = {"negative": "blurry", "width": "512", "height": "512", "steps": "20", "guidance": "7.5", "seed": "42"}


def _number(key: str, name: str, value: str, where: str, multiple: int):
    if key == "guidance":
        try:
            g = float(value)
        except ValueError:
            g = math.nan
        if not math.isfinite(g) or g < 0:
            raise UserError(f"{where}: --{name} must be a number >= 0 (got '{value}'), e.g. --{name} 7.5")
        return g
    n = int(value) if re.fullmatch(r"\d+", value) else None
    if key in ("width", "height") and (n is None or n == 0 or n % multiple):
        raise UserError(f"{where}: --{name} must be a positive multiple of {multiple} (got '{value}'), e.g. --{name} "
                        f"{max(multiple, (n or 512) // multiple * multiple)}")
    if key == "steps" and (n is None or not 1 <= n <= MAX_STEPS):
        raise UserError(f"{where}: --{name} must be a whole number from 1 to {MAX_STEPS} (got '{value}')")
    if key == "seed" and (n is None or n >= 2**63):
        raise UserError(f"{where}: --{name} must be a whole number from 0 to 2^63-1 (got '{value}')")
    return n
