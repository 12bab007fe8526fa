"""mkdocs hook: the flag reference (docs/flags.md) written at build time from the command lines' own argparse
parsers, so the page cannot drift from `--help`. tests/test_docs.py runs `missing_help()` from this file.

Each recipe is an object with `.parser()` returning its argparse parser; `sdlora` itself is `build_parser()`.
"""
from __future__ import annotations

import argparse

from sdlora.recipes import RECIPES  # each recipe module builds its own parser

MARKER = "<!-- generated: flag tables -->"


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    # argparse has no public accessor for a parser's arguments; _actions is what its own help formatter reads.
    return [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command line with flags, by how it is typed: the recipes, then `sdlora`'s other subcommands."""
    from sdlora.cli import build_parser

    found = {f"sdlora train {name}": recipe.parser() for name, recipe in RECIPES.items()}
    for name, sub in _subcommands(build_parser()).items():
        if name == "train":  # its flags are the recipes'
            continue
        nested = _subcommands(sub)
        for inner, inner_parser in (nested.items() if nested else [("", sub)]):
            found[" ".join(filter(None, ["sdlora", name, inner]))] = inner_parser
    return found


def missing_help() -> dict[str, list[str]]:
    """Flags without help text, per command line."""
    return {cmd: [a.option_strings[-1] for a in _options(p) if not (a.help or "").strip()]
            for cmd, p in parsers().items()}


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if not action.default else "on"
    if action.default in (None, argparse.SUPPRESS) or action.required:
        return "(required)" if action.required else ""
    return f"`{_cell(action.default)}`"


def _help(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    text = action.help or ""
    if "%" in text:
        text = text % {**vars(action), "prog": parser.prog}
    if action.choices is not None and not isinstance(action.choices, dict):
        text += (" " if text else "") + "One of: " + ", ".join(f"`{c}`" for c in action.choices) + "."
    return _cell(text)


def table(parser: argparse.ArgumentParser) -> str:
    rows = ["| flag | default | help |", "|---|---|---|"]
    for a in _options(parser):
        flags = ", ".join(f"`{o}`" for o in a.option_strings)
        rows.append(f"| {flags} | {_default(a)} | {_help(a, parser)} |")
    return "\n".join(rows)


def render() -> str:
    parts = []
    for cmd, parser in parsers().items():
        parts.append(f"## `{cmd}`\n")
        positionals = [a.metavar or a.dest for a in parser._actions
                       if not a.option_strings and a.help is not argparse.SUPPRESS]
        if positionals:
            parts.append("Arguments: " + " ".join(f"`{_cell(p)}`" for p in positionals) + "\n")
        parts.append(table(parser) + "\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "flags.md":
        return markdown.replace(MARKER, render())
    return markdown
