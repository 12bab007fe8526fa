"""The LoRA file tools as whole operations: each checks its paths, reads, writes and returns the text it reports.
What `sdlora inspect | convert | resize | merge | extract` print, and what the UI's Tools tab shows."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .lora import formats
from .lora.tools import describe, extract, merge, resize
from .pipeline.adapters import parse_spec


def guard(out, *inputs):
    """Refuse to write over an input, into an input folder, or as a folder holding an input file."""
    out = Path(out).resolve()
    for src in inputs:
        p = Path(str(src)).resolve()
        if not p.exists():
            continue
        folder = p if p.is_dir() else p.parent
        if out == p or (out.suffix != ".safetensors" and out == folder) or (p.is_dir() and out.is_relative_to(p)):
            raise UserError(f"{out}: refusing to overwrite the input {src}; choose another output path")


def description_lines(d: dict) -> list[str]:
    """`lora.tools.describe`'s dict as `sdlora inspect` shows it."""
    size = f"{d['size_bytes'] / 1e6:.2f} MB" if d["size_bytes"] is not None else "?"
    comps = ", ".join(f"{c} ({n} layers)" for c, n in d["components"].items())
    lines = [f"file:           {d['file']}",
             f"format:         {d['format']}",
             f"base model:     {d['base_model'] or 'unknown'}",
             f"architecture:   {d['architecture']}",
             f"components:     {comps}",
             f"rank(s):        {', '.join(map(str, d['ranks'])) or 'none (LoKr layers with both factors full)'}",
             f"alpha(s):       {', '.join(f'{a:g}' for a in d['alphas']) or 'none (scale 1)'}",
             f"target modules: {d['target_modules']} ({d['conv_layers']} conv)"]
    if set(d["layer_types"]) != {"LoRA"}:
        lines.append(f"layer types:    {', '.join(f'{k} ({n})' for k, n in d['layer_types'].items())}"
                     " (LyCORIS; diffusers' load_lora_weights cannot read them, sdlora's loader can)")
    if d["dora_layers"]:
        lines.append(f"DoRA:           {d['dora_layers']} layers carry magnitudes (weight-decomposed LoRA)")
    lines += [f"parameters:     {d['parameters']:,}",
              f"dtype:          {', '.join(d['dtype'])}",
              f"size:           {size}",
              "metadata:" + ("" if d["metadata"] else " none")]
    for k, v in d["metadata"].items():
        v = v.replace("\n", " ")
        lines.append(f"  {k}: {v[:100] + '…' if len(v) > 100 else v}")
    return lines


def inspect_file(file, allow_pickle: bool = False, as_json: bool = False) -> str:
    """A LoRA's format, base, architecture, ranks and metadata, and what each loader makes of it (JSON with
    as_json)."""
    from dataclasses import asdict

    from .lora import loaders

    path = formats.resolve_file(file)
    lora = formats.load_lora(file, allow_pickle=allow_pickle)
    d = describe(lora, path)
    readings = loaders.read_file(path, lora, allow_pickle)
    if as_json:
        return json.dumps({**d, "loaders": [asdict(r) for r in readings]}, indent=2)
    lines = description_lines(d) + ["loaders (from their key conventions):"]
    lines += ["  " + line for line in loaders.summary(readings)]
    if (warning := loaders.warning(readings)):
        lines.append(f"warning: {path.name} {warning}; " + loaders.advice(lora))
    return "\n".join(lines)


def convert_file(src, out, to: str, dtype=None, overwrite: bool = False, allow_pickle: bool = False) -> str:
    guard(out, src)
    formats.check_output(out, to, overwrite)
    lora = formats.load_lora(src, allow_pickle=allow_pickle)
    file = formats.save_lora(lora, out, to, dtype)
    lines = [f"converted {lora.format} -> {to}: {file}"]
    kinds = sorted({formats.LYCORIS_NAMES[m.kind] for m in lora.modules.values() if m.kind != "lora"})
    if kinds and to != "kohya":
        lines.append(f"note: its {'/'.join(kinds)} layers keep LyCORIS' factors; sdlora's loader applies them, "
                     "diffusers' load_lora_weights does not")
    return "\n".join(lines)


def kept_lines(kept: dict, rank: int) -> list[str]:
    """How much of each layer's norm a rank reduction kept, and the least and mean of it."""
    lines = [f"share of each layer's Frobenius norm kept at rank {rank}:"]
    lines += [f"  {share * 100:7.2f}%  {name}" for name, share in kept.items()]
    values = list(kept.values())
    lines.append(f"norm kept: min {min(values) * 100:.2f}%, mean {sum(values) / len(values) * 100:.2f}% "
                 f"over {len(values)} layers")
    return lines


def resize_file(src, out, rank: int, to=None, dtype=None, overwrite: bool = False, allow_pickle: bool = False) -> str:
    guard(out, src)
    lora = formats.load_lora(src, allow_pickle=allow_pickle)
    formats.check_output(out, to or lora.format, overwrite)
    small, kept = resize(lora, rank)
    file = formats.save_lora(small, out, to or lora.format, dtype)
    return "\n".join(kept_lines(kept, rank) + [f"wrote {file}"])


def merge_files(specs, out, rank=None, to=None, dtype=None, overwrite: bool = False,
                allow_pickle: bool = False) -> str:
    """Weighted LoRAs ('path[:weight]' each) merged into `out`, exactly or SVD-reduced to `rank`."""
    if not specs or not str(out or ""):
        raise UserError("merge needs at least one input LoRA and an output path: A[:w] B[:w] … OUT")
    specs = [parse_spec(s) for s in specs]
    guard(out, *[p for p, _ in specs])
    loras = [(formats.load_lora(p, allow_pickle=allow_pickle), w) for p, w in specs]
    formats.check_output(out, to or loras[0][0].format, overwrite)
    merged, kept = merge(loras, rank)
    file = formats.save_lora(merged, out, to or loras[0][0].format, dtype)
    ranks = sorted({m.rank for m in merged.modules.values()})
    return "\n".join((kept_lines(kept, rank) if rank else []) +
                     [f"merged {len(loras)} LoRAs (rank {', '.join(map(str, ranks))}) into {file}"])


def extract_file(base, tuned, rank: int, out, to: str = "diffusers", dtype=None, text_encoder: bool = True,
                 overwrite: bool = False, allow_pickle: bool = False, base_config=None) -> str:
    """A LoRA approximating tuned - base at `rank`, written to `out`; a single-file model loads with `base_config`."""
    guard(out, base, tuned)
    formats.check_output(out, to, overwrite)
    lora, kept = extract(base, tuned, rank, text_encoder=text_encoder, allow_pickle=allow_pickle,
                         base_config=base_config)
    file = formats.save_lora(lora, out, to, dtype)
    return "\n".join(kept_lines(kept, rank) + [f"extracted {len(lora.modules)} layers into {file}"])
