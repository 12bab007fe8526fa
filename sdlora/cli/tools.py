"""`sdlora inspect | convert | resize | merge | extract | make-tiny`: the LoRA file tools on the command line."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..lora import formats
from ..lora.tools import describe, extract, merge, resize
from ..pipeline import parse_spec

SAVE_PRECISIONS = ("fp32", "fp16", "bf16")


def _print_description(d: dict):
    size = f"{d['size_bytes'] / 1e6:.2f} MB" if d["size_bytes"] is not None else "?"
    comps = ", ".join(f"{c} ({n} layers)" for c, n in d["components"].items())
    print(f"file:           {d['file']}")
    print(f"format:         {d['format']}")
    print(f"base model:     {d['base_model'] or 'unknown'}")
    print(f"architecture:   {d['architecture']}")
    print(f"components:     {comps}")
    print(f"rank(s):        {', '.join(map(str, d['ranks'])) or 'none (LoKr layers with both factors full)'}")
    print(f"alpha(s):       {', '.join(f'{a:g}' for a in d['alphas']) or 'none (scale 1)'}")
    print(f"target modules: {d['target_modules']} ({d['conv_layers']} conv)")
    if set(d["layer_types"]) != {"LoRA"}:
        print(f"layer types:    {', '.join(f'{k} ({n})' for k, n in d['layer_types'].items())}"
              " (LyCORIS; diffusers' load_lora_weights cannot read them, sdlora's loader can)")
    if d["dora_layers"]:
        print(f"DoRA:           {d['dora_layers']} layers carry magnitudes (weight-decomposed LoRA)")
    print(f"parameters:     {d['parameters']:,}")
    print(f"dtype:          {', '.join(d['dtype'])}")
    print(f"size:           {size}")
    print("metadata:" + ("" if d["metadata"] else " none"))
    for k, v in d["metadata"].items():
        v = v.replace("\n", " ")
        print(f"  {k}: {v[:100] + '…' if len(v) > 100 else v}")


def _guard(out, *inputs):
    """Refuse to write over an input, into an input folder, or as a folder holding an input file."""
    out = Path(out).resolve()
    for src in inputs:
        p = Path(str(src)).resolve()
        if not p.exists():
            continue
        folder = p if p.is_dir() else p.parent
        if out == p or (out.suffix != ".safetensors" and out == folder) or (p.is_dir() and out.is_relative_to(p)):
            raise UserError(f"{out}: refusing to overwrite the input {src}; choose another output path")


def _inspect_cli(args):
    from dataclasses import asdict

    from ..lora import loaders

    path = formats.resolve_file(args.file)
    lora = formats.load_lora(args.file, allow_pickle=args.allow_pickle)
    d = describe(lora, path)
    readings = loaders.read_file(path, lora, args.allow_pickle)
    if args.json:
        print(json.dumps({**d, "loaders": [asdict(r) for r in readings]}, indent=2))
        return
    _print_description(d)
    print("loaders (from their key conventions):")
    for line in loaders.summary(readings):
        print("  " + line)
    if (warning := loaders.warning(readings)):
        print(f"warning: {path.name} {warning}; " + loaders.advice(lora))


def _convert_cli(args):
    _guard(args.out, args.input)
    formats.check_output(args.out, args.to, args.overwrite)
    lora = formats.load_lora(args.input, allow_pickle=args.allow_pickle)
    file = formats.save_lora(lora, args.out, args.to, args.dtype)
    print(f"converted {lora.format} -> {args.to}: {file}")
    kinds = sorted({formats.LYCORIS_NAMES[m.kind] for m in lora.modules.values() if m.kind != "lora"})
    if kinds and args.to != "kohya":
        print(f"note: its {'/'.join(kinds)} layers keep LyCORIS' factors; sdlora's loader applies them, diffusers' "
              "load_lora_weights does not")


def _print_kept(kept: dict):
    for name, share in kept.items():
        print(f"  {share * 100:7.2f}%  {name}")
    values = list(kept.values())
    print(f"norm kept: min {min(values) * 100:.2f}%, mean {sum(values) / len(values) * 100:.2f}% "
          f"over {len(values)} layers")


def _resize_cli(args):
    _guard(args.out, args.input)
    lora = formats.load_lora(args.input, allow_pickle=args.allow_pickle)
    formats.check_output(args.out, args.to or lora.format, args.overwrite)
    small, kept = resize(lora, args.rank)
    file = formats.save_lora(small, args.out, args.to or lora.format, args.dtype)
    print(f"share of each layer's Frobenius norm kept at rank {args.rank}:")
    _print_kept(kept)
    print(f"wrote {file}")


def _merge_cli(args):
    if len(args.items) < 2:
        raise UserError("merge needs at least one input LoRA and an output path: A[:w] B[:w] … OUT")
    *specs, out = args.items
    specs = [parse_spec(s) for s in specs]
    _guard(out, *[p for p, _ in specs])
    loras = [(formats.load_lora(p, allow_pickle=args.allow_pickle), w) for p, w in specs]
    formats.check_output(out, args.to or loras[0][0].format, args.overwrite)
    merged, kept = merge(loras, args.rank)
    file = formats.save_lora(merged, out, args.to or loras[0][0].format, args.dtype)
    if args.rank:
        print(f"share of each layer's Frobenius norm kept at rank {args.rank}:")
        _print_kept(kept)
    ranks = sorted({m.rank for m in merged.modules.values()})
    print(f"merged {len(loras)} LoRAs (rank {', '.join(map(str, ranks))}) into {file}")


def _extract_cli(args):
    _guard(args.out, args.base, args.tuned)
    formats.check_output(args.out, args.to, args.overwrite)
    lora, kept = extract(args.base, args.tuned, args.rank, text_encoder=not args.unet_only,
                         allow_pickle=args.allow_pickle)
    file = formats.save_lora(lora, args.out, args.to, args.dtype)
    print(f"share of each layer's Frobenius norm kept at rank {args.rank}:")
    _print_kept(kept)
    print(f"extracted {len(lora.modules)} layers into {file}")


def _make_tiny_cli(args):
    from ..tiny import is_xl, make_tiny

    out = make_tiny(args.dir, arch=args.arch, seed=args.seed)
    kind = "StableDiffusionXLPipeline" if is_xl(args.arch) else "StableDiffusionPipeline"
    print(f"wrote a {args.arch}-architecture {kind} (random weights) to {out}")


def register(sub):
    def common(s, to_default=None, to_required=False):
        s.add_argument("--to", choices=formats.FORMATS, default=to_default, required=to_required,
                       help="output format" + ("" if to_required else " (default: the input's)"))
        s.add_argument("--dtype", choices=list(SAVE_PRECISIONS), help="cast the LoRA weights on write")
        s.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt/.ckpt inputs (they can run code)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    s = sub.add_parser("convert", help="convert a LoRA between diffusers, kohya (A1111/ComfyUI) and peft formats")
    s.add_argument("input")
    s.add_argument("out")
    common(s, to_required=True)
    s.set_defaults(func=_convert_cli)

    s = sub.add_parser("extract", help="a LoRA approximating the difference between two models (plain LoRA/LoCon "
                       "layers)")
    s.add_argument("--base", required=True)
    s.add_argument("--tuned", required=True)
    s.add_argument("--rank", type=int, required=True)
    s.add_argument("--unet-only", action="store_true", help="ignore text-encoder differences")
    s.add_argument("out")
    common(s, to_default="diffusers")
    s.set_defaults(func=_extract_cli)

    s = sub.add_parser("inspect", help="show a LoRA file's format, base, architecture, ranks and metadata")
    s.add_argument("file")
    s.add_argument("--json", action="store_true")
    s.add_argument("--allow-pickle", action="store_true")
    s.set_defaults(func=_inspect_cli)

    s = sub.add_parser("merge", help="merge weighted LoRAs into one: A[:w] B[:w] … OUT (plain LoRA/LoCon files; not "
                       "DoRA, LoHa or LoKr)")
    s.add_argument("items", nargs="+", metavar="LORA[:W] … OUT")
    s.add_argument("--rank", type=int, help="SVD-reduce to this rank (default: exact, ranks concatenated)")
    common(s)
    s.set_defaults(func=_merge_cli)

    s = sub.add_parser("resize", help="reduce a LoRA's rank by SVD (plain LoRA/LoCon files; not DoRA, LoHa or LoKr)")
    s.add_argument("input")
    s.add_argument("out")
    s.add_argument("--rank", type=int, required=True)
    common(s)
    s.set_defaults(func=_resize_cli)

    s = sub.add_parser("make-tiny", help="write a pipeline with random weights: tiny SD1.x/2.x/XL layouts for "
                                         "tests, or SD 1.5's / SDXL's real architecture for benchmarks")
    s.add_argument("dir")
    s.add_argument("--arch", default="tiny", choices=["tiny", "sd15", "sd2-tiny", "sdxl-tiny", "sdxl"],
                   help="tiny: SD 1.x layout (default); sd15: SD 1.5's configs (~4 GB); sd2-tiny: SD 2.x layout, "
                        "v-prediction; sdxl-tiny: SDXL layout (two text encoders); sdxl: SDXL base 1.0's "
                        "configs (~13.5 GB in fp32)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_make_tiny_cli)
