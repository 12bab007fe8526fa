"""How a training setting is declared: `setting(default, help, **meta)`, a dataclass field that is also a flag."""
from __future__ import annotations

from dataclasses import Field, field
from typing import Any

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MUST_MATCH, OPTIONAL = "must match", "optional"  # the "resume" tag's values


def setting(default: Any = None, help: str = "", **meta) -> Field:
    """A field that is a flag: `default` and `help` as --help shows them; `meta` holds argparse's extras (flag,
    aliases, choices, metavar, required) and the tags (resume, card, header)."""
    return field(default=default, metadata={"help": help, **meta})


def flag_name(f: Field) -> str | None:
    """The flag a field is (without dashes), or None for a resolved-only field."""
    return f.metadata.get("flag", f.name) if "help" in f.metadata else None
