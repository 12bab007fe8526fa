"""The shipped presets (sdlora/assets/presets/*.toml): config files for common jobs, each opening with a comment
on what it is for and a `# label:` line (the GPU memory it is meant to fit)."""
from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import UserError

FOLDER = Path(__file__).resolve().parent.parent / "assets" / "presets"


def names() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.toml"))


def path(name: str) -> Path:
    """The preset file called `name`; an unknown one is one line with the nearest name."""
    if name not in names():
        near = difflib.get_close_matches(name, names(), n=1)
        raise UserError(f"--preset {name}: no such preset" + (f"; did you mean {near[0]}?" if near else "") +
                        f" (`sdlora presets` lists them: {', '.join(names())})")
    return FOLDER / f"{name}.toml"


def about(name: str) -> dict:
    """The preset's opening comment: {"about": its first line, and its `# key: value` lines ("label": the GPU memory it
    is meant for, e.g. "8 GB"; "recipe": text-to-image or dreambooth; "arch": sd15 or sdxl; "predicted": the GPU
    peak benchmarks/gpu_memory.py --presets predicts for it, e.g. "6.55 GiB (…)")}."""
    info = {"about": "", "label": "", "recipe": "text-to-image", "arch": "sd15", "predicted": ""}
    for line in path(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        key, _, value = text.partition(":")
        if key in info and key != "about" and value:
            info[key] = value.strip()
        elif not info["about"]:
            info["about"] = text
    return info


def label_bytes(label: str) -> int:
    """A label's memory in bytes ("8 GB" -> 8e9: GPU makers' gigabytes)."""
    number, _, unit = label.partition(" ")
    return int(float(number) * {"GB": 1e9, "GiB": 2**30}[unit.strip() or "GB"])
