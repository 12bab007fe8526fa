"""`sdlora presets`: the shipped presets (sdlora/assets/presets), one line each, for `--preset NAME`."""
from __future__ import annotations

from ..recipes import presets


def _presets_cli(args):
    rows = [(n, presets.about(n)) for n in presets.names()]
    width = max(len(n) for n, _ in rows)
    for name, info in rows:
        peak = info["predicted"].split(" (")[0] or "?"
        print(f"{name:<{width}}  {info['label']:>6}  predicted {peak:>9}  {info['recipe']:<13}  {info['about']}")
    print("use: sdlora train RECIPE --preset NAME [flags]; flags and --config_file override the preset "
          "(predicted: the GPU peak benchmarks/gpu_memory.py --presets predicts; docs/config-files.md#presets)")


def register(sub):
    s = sub.add_parser("presets", help="list the shipped presets (--preset NAME)",
                       description="List the shipped presets: name, the GPU memory it is made for, recipe, purpose.")
    s.set_defaults(func=_presets_cli)
