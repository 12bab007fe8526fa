"""`sdlora` command line: one subcommand per tool; bad input exits 2 with a one-line message.

The CLI owns argparse, printing and logging set-up; the library under it returns values and
raises `UserError`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from . import generate, tools, train, ui
    from .parser import Parser

    p = Parser(prog="sdlora", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)  # one-line errors in each subcommand
    for module in (train, generate, tools, ui):
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


class RedactToken(logging.Filter):
    """Replace the token in any log record (ours or a library's) that happens to contain it."""

    def __init__(self, token: str):
        super().__init__()
        self.token = token

    def filter(self, record):
        if self.token and self.token in record.getMessage():
            record.msg, record.args = record.getMessage().replace(self.token, "***"), ()
        return True


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (as logging's own last-resort handler does), not the
    stream of the moment it was made: a recipe run in-process twice (a notebook, the tests) after stderr was
    swapped would otherwise write to a closed stream and print a logging traceback."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(token: str | None = None):
    """Plain INFO logs on stderr (the main process only), with any token redacted, without known noise."""
    from ..logs import silence_noise

    silence_noise()
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if token:
        handler.addFilter(RedactToken(token))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # Only the main process speaks, so a skipped file is named once, not once per process.
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.getLogger("sdlora").setLevel(logging.INFO if rank == 0 else logging.ERROR)

