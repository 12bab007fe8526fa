"""`sdlora` command line: one subcommand per tool; bad input exits 2 with a one-line message."""
from __future__ import annotations

import argparse
import sys

from .errors import UserError


def _make_tiny(args):
    from .tiny import make_tiny

    out = make_tiny(args.dir, arch=args.arch, seed=args.seed)
    print(f"wrote a {args.arch} SD-architecture pipeline (random weights) to {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdlora", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-tiny", help="write a tiny SD1.x-architecture pipeline with random weights")
    s.add_argument("dir")
    s.add_argument("--arch", default="tiny", choices=["tiny", "sd15"])
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_make_tiny)

    # Subcommands from other modules register themselves here (keep this list sorted).
    for register in _registrars():
        register(sub)
    return p


def _registrars():
    from .pipeline import register_cli as pipeline_cli
    from .tools import register_cli as tools_cli

    return [pipeline_cli, tools_cli]


def main(argv=None):
    from .logs import silence_noise

    args = build_parser().parse_args(argv)
    silence_noise()
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
