"""The argument parser of every sdlora command line (both recipes, `sdlora` and its subcommands): whole flag names
only, and a usage error as one `error:` line, a typo'd flag with the flag it was probably meant to be."""
from __future__ import annotations

import argparse
import difflib
import re


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations (`--learning_rat` would otherwise mean --learning_rate, and a flag added later
    could change what an old command means), whose errors are one line on stderr with exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            # A subcommand hands its unknown flags up to here: suggest from the parser that was given them.
            self.error(_chosen(self, ns)._unrecognized(extra))
        return ns

    def _unrecognized(self, extra: list[str]) -> str:
        """The message for unknown flags: "unrecognized argument --learning_rat; did you mean --learning_rate?"."""
        flags = [a for a in extra if re.match(r"-+[^\d.\W]", a)] or extra[:1]
        known = [o for a in self._actions for o in a.option_strings]
        near = [difflib.get_close_matches(a.split("=", 1)[0], known, n=1) for a in flags]
        if len(flags) == 1:
            said = flags[0] + (f"; did you mean {near[0][0]}?" if near[0] else "")
        else:
            said = ", ".join(a + (f" (did you mean {m[0]}?)" if m else "") for a, m in zip(flags, near))
        return f"unrecognized argument{'s' * (len(flags) > 1)} {said} (--help lists all flags)"

    def error(self, message: str):
        """One line instead of argparse's usage block (67 lines for a recipe); --help still prints it all."""
        self.exit(2, f"error: {message}\n")


def _chosen(parser: argparse.ArgumentParser, ns) -> Parser:
    """The innermost subcommand parser that `ns` was parsed with (`parser` itself without subcommands)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(getattr(ns, action.dest, None) or "")
            if isinstance(sub, Parser):
                return _chosen(sub, ns)
    return parser

