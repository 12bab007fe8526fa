"""`sdlora` command line: one subcommand per tool; bad input exits 2 with a one-line message.

The CLI owns argparse, printing and logging set-up; the library under it returns values and
raises `UserError`.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from . import caption, generate, presets, tools, train, ui
    from .parser import Parser

    p = Parser(prog="sdlora", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)  # one-line errors in each subcommand
    for module in (train, presets, generate, caption, tools, ui):
        module.register(sub)
    return p


def main(argv=None):
    from ..logs import silence_noise

    silence_noise()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
