"""`sdlora presets`: the shipped presets (sdlora/assets/presets), one line each, for `--preset NAME`."""
from __future__ import annotations

from ..recipes import presets


def _presets_cli(args):
    rows = [(n, presets.about(n)) for n in presets.names()]
    width = max(len(n) for n, _ in rows)
    for name, info in rows:
        print(f"{name:<{width}}  {info['label']:>6}  {info['recipe']:<13}  {info['about']}")
    print("use: sdlora train RECIPE --preset NAME [flags]; flags and --config_file override the preset "
          "(GPU memory labels: see docs/config-files.md#presets)")


def register(sub):
    s = sub.add_parser("presets", help="list the shipped presets (--preset NAME)",
                       description="List the shipped presets: name, the GPU memory it is made for, recipe, purpose.")
    s.set_defaults(func=_presets_cli)
