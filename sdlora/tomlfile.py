"""TOML files: read with the standard library's tomllib (the `tomli` package, its origin, before Python 3.11), and
written flat (top-level keys whose values are strings, numbers, booleans or lists of them, each with an optional
comment): all sdlora writes are such files, so a ~30-line writer checked by reading its output back replaces a
dependency (tomllib reads only)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def read(path, what: str) -> dict:
    """The TOML file at `path` as a dict; a missing, unreadable or malformed file is one line naming `what` (the
    flag that gave it)."""
    p = Path(path).expanduser()
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path}: cannot be read as UTF-8 text ({e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{what} {path}: not valid TOML ({e}); see https://toml.io") from None


def value(v) -> str:
    """One TOML value: a bool, int, float, str or a list of them."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else ("-inf" if v < 0 else "inf")) if not math.isfinite(v) else repr(v)
    if isinstance(v, str):
        # JSON's escapes (\" \\ \n \t \uXXXX …) are TOML's; DEL is the one character TOML wants escaped and JSON not
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"no TOML value for {type(v).__name__}")


def dumps(values: dict, comments: dict | None = None, header: str = "") -> str:
    """A flat TOML document of `values` (key -> value), each preceded by its comment in `comments`; `header` opens the
    file as comment lines. Checked by reading it back."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for k, v in values.items():
        if comments and comments.get(k):
            lines.append("")
            lines += [f"# {line}".rstrip() for line in comments[k].splitlines()]
        lines.append(f"{k} = {value(v)}")
    text = "\n".join(lines) + "\n"
    back = tomllib.loads(text)
    assert back == {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()} or any(
        isinstance(v, float) and math.isnan(v) for v in values.values()), "TOML written != read"
    return text
