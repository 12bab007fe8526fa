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
    """{"about": the opening comment's first line, "label": its `# label:` value (e.g. "8 GB"), or ""}."""
    lines = path(name).read_text(encoding="utf-8").splitlines()
    comment = [line[1:].strip() for line in lines if line.startswith("#")]
    label = next((c.split(":", 1)[1].strip() for c in comment if c.lower().startswith("label:")), "")
    return {"about": comment[0] if comment else "", "label": label}
