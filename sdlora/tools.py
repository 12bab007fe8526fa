"""LoRA file tools: inspect, convert, resize (SVD), merge, extract; plus `demo_lora` for tests and benchmarks."""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path

from . import formats
from .errors import UserError
from .formats import Lora, Module

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


# ---------------------------------------------------------------- inspect

def describe(lora: Lora, path=None) -> dict:
    mods = lora.modules.values()
    ranks = collections.Counter(m.rank for m in mods)
    alphas = collections.Counter(m.alpha for m in mods)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for m in mods for t in (m.down, m.up)})
    per_comp = collections.Counter(n.split(".", 1)[0] for n in lora.modules)
    size = Path(path).stat().st_size if path and Path(path).is_file() else None
    return {
        "file": str(path or lora.source), "format": lora.format, "base_model": lora.base_model,
        "architecture": formats.family(lora), "components": dict(per_comp),
        "ranks": sorted(ranks), "alphas": sorted(alphas), "target_modules": len(lora.modules),
        "parameters": sum(m.down.numel() + m.up.numel() for m in mods), "dtype": dtypes, "size_bytes": size,
        "conv_layers": sum(m.down.dim() == 4 for m in mods),
        "metadata": {k: _safe(v) for k, v in sorted(lora.metadata.items())},
    }


def _safe(value: str) -> str:
    """Metadata is free text: never echo something that looks like an access token."""
    return re.sub(r"\b(hf_|ghp_|sk-)[A-Za-z0-9_-]{16,}", r"\1<redacted>", str(value))


def _print_description(d: dict):
    size = f"{d['size_bytes'] / 1e6:.2f} MB" if d["size_bytes"] is not None else "?"
    comps = ", ".join(f"{c} ({n} layers)" for c, n in d["components"].items())
    print(f"file:           {d['file']}")
    print(f"format:         {d['format']}")
    print(f"base model:     {d['base_model'] or 'unknown'}")
    print(f"architecture:   {d['architecture']}")
    print(f"components:     {comps}")
    print(f"rank(s):        {', '.join(map(str, d['ranks']))}")
    print(f"alpha(s):       {', '.join(f'{a:g}' for a in d['alphas'])}")
    print(f"target modules: {d['target_modules']} ({d['conv_layers']} conv)")
    print(f"parameters:     {d['parameters']:,}")
    print(f"dtype:          {', '.join(d['dtype'])}")
    print(f"size:           {size}")
    print("metadata:" + ("" if d["metadata"] else " none"))
    for k, v in d["metadata"].items():
        v = v.replace("\n", " ")
        print(f"  {k}: {v[:100] + '…' if len(v) > 100 else v}")


# ---------------------------------------------------------------- SVD tools

def _svd(up: torch.Tensor, down: torch.Tensor):
    """SVD of up @ down (rank r) from two QRs and an r×r SVD: exact and cheap for wide layers."""
    import torch

    qu, ru = torch.linalg.qr(up.float().flatten(1))
    qd, rd = torch.linalg.qr(down.float().flatten(1).T)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    return qu @ u, s, vh @ qd.T


def _factor(u, s, vh, rank, scale, shape_in, out_dim, dtype):
    """Split U S Vh (top `rank`) into up/down with alpha = rank·scale, so up@down·alpha/rank = U S Vh."""
    import torch

    root = (s[:rank] / scale).sqrt()
    up = (u[:, :rank] * root).reshape(out_dim, rank, *([1, 1] if len(shape_in) == 3 else []))
    down = (root[:, None] * vh[:rank]).reshape(rank, *shape_in)
    return Module(down.to(dtype).contiguous(), up.to(dtype).contiguous(), float(rank * scale))


def resize(lora: Lora, rank: int):
    """Reduce every layer to at most `rank` by SVD; returns (new LoRA, {layer: share of Frobenius norm kept})."""
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    out, kept = {}, {}
    for name, m in lora.modules.items():
        if m.rank <= rank:
            out[name], kept[name] = m, 1.0
            continue
        u, s, vh = _svd(m.up, m.down)
        scale = (m.alpha / m.rank) or 1.0  # keep the file's alpha/rank ratio
        s = s * (m.alpha / m.rank)  # singular values of the layer's actual weight change
        out[name] = _factor(u, s, vh, rank, scale, m.down.shape[1:], m.up.shape[0], m.down.dtype)
        kept[name] = float((s[:rank].square().sum() / s.square().sum().clamp_min(1e-30)).sqrt())
    meta = dict(lora.metadata, ss_network_dim=str(rank))
    return formats.with_modules(lora, out, metadata=meta), kept


def merge(loras: list[tuple[Lora, float]], rank: int | None = None):
    """One LoRA equal to sum(w·LoRA): exact by concatenating ranks, or SVD-reduced to `rank`."""
    import torch

    names = list(dict.fromkeys(n for lo, _ in loras for n in lo.modules))
    out = {}
    for name in names:
        parts = [(lo.modules[name], w, lo.source) for lo, w in loras if name in lo.modules]
        shapes = {(p[0].up.shape[0], *p[0].down.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise UserError(f"{parts[1][2]}: layer {name} has shape {list(shapes)[1]}, but {parts[0][2]} has "
                            f"{list(shapes)[0]}; expected LoRAs for the same base architecture")
        ups = [(m.up.float() * (w * m.alpha / m.rank)) for m, w, _ in parts]
        up, down = torch.cat(ups, 1), torch.cat([m.down.float() for m, _, _ in parts], 0)
        dtype = parts[0][0].down.dtype
        out[name] = Module(down.to(dtype), up.to(dtype), float(down.shape[0]))
    first = loras[0][0]
    meta = {k: v for k, v in first.metadata.items() if not k.startswith("ss_network_")}
    meta["sdlora_merged_from"] = json.dumps([[lo.source, w] for lo, w in loras])
    merged = formats.with_modules(first, out, metadata=meta)
    return resize(merged, rank) if rank else (merged, {n: 1.0 for n in out})


def extract(base, tuned, rank: int, text_encoder: bool = True, min_change: float = 1e-6, allow_pickle: bool = False):
    """A LoRA approximating tuned - base for every Linear/Conv2d that differs; returns (LoRA, kept shares)."""
    import torch

    from .pipeline import quiet

    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    modules, kept = {}, {}
    for comp in ("unet", "text_encoder") if text_encoder else ("unet",):
        with quiet():
            a, b = _component(base, comp, allow_pickle), _component(tuned, comp, allow_pickle)
        if a is None or b is None:
            continue
        tuned_layers = dict(b.named_modules())
        for path, layer in a.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            other = tuned_layers.get(path)
            if other is None or other.weight.shape != layer.weight.shape:
                raise UserError(f"{tuned}: {comp}.{path} is missing or differently shaped; expected the same "
                                f"architecture as {base}")
            d = other.weight.detach().float() - layer.weight.detach().float()
            if d.norm() <= min_change * layer.weight.detach().float().norm():
                continue
            u, s, vh = torch.linalg.svd(d.flatten(1), full_matrices=False)
            r = min(rank, s.shape[0])
            name = formats.canonical(comp, path)
            modules[name] = _factor(u, s, vh, r, 1.0, d.shape[1:], d.shape[0], torch.float32)
            kept[name] = float((s[:r].square().sum() / s.square().sum()).sqrt())
    if not modules:
        raise UserError(f"{tuned}: no layer differs from {base}; nothing to extract")
    meta = {"sdlora_extracted_from": json.dumps({"base": str(base), "tuned": str(tuned)})}
    return Lora(modules, meta, "diffusers", str(tuned), base_model=str(base)), kept


def _component(model, comp, allow_pickle: bool = False):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    cls = UNet2DConditionModel if comp == "unet" else CLIPTextModel
    try:  # safetensors only unless the user opts in: pickle weights can run code
        return cls.from_pretrained(str(model), subfolder=comp, use_safetensors=None if allow_pickle else True)
    except Exception as e:
        if comp != "unet" and not (Path(str(model)) / comp).exists() and Path(str(model)).exists():
            return None
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        hint = formats.PICKLE_BASE_HINT if "safetensors" in reason and not allow_pickle else \
            "expected a diffusers Stable Diffusion folder or Hub id"
        raise UserError(f"{model}: could not load its {comp} ({reason}); {hint}") from None


# ---------------------------------------------------------------- demo LoRAs (tests, benchmarks, docs)

def demo_lora(out, base=None, unet=None, rank: int = 4, alpha: float | None = None, targets=ATTENTION,
              seed: int = 0, strength: float = 0.3, text_encoder=None, text_targets=None):
    """Write a random LoRA exactly as sdlora's trainer does (diffusers' save_lora_weights + ss_* metadata
    + model card). Give `base` (a pipeline folder) or a `unet` module; returns the weights file."""
    import torch

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    from . import __version__
    from .io import save_safetensors, write_text

    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
    had_adapters = bool(getattr(unet, "peft_config", None))
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=False, target_modules=list(targets))
    unet.add_adapter(cfg, adapter_name="sdlora_demo")
    for n, p in unet.named_parameters():
        if "lora_B" in n:  # visible but bounded effect regardless of layer width
            p.data = torch.randn_like(p) * strength / p.shape[1] ** 0.5
    layers = get_peft_model_state_dict(unet, adapter_name="sdlora_demo")
    if set(targets) <= set(ATTENTION):
        # Only attention keys get renamed (lora.down/up); a mix of styles makes diffusers drop the renamed ones.
        layers = convert_state_dict_to_diffusers(layers)
    kwargs = dict(unet_lora_layers=layers, unet_lora_adapter_metadata=cfg.to_dict())
    te_cfg = None
    if text_encoder is not None:
        te_cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=False,
                            target_modules=list(text_targets or ["q_proj", "k_proj", "v_proj", "out_proj"]))
        inject_adapter_in_model(te_cfg, text_encoder, adapter_name="sdlora_demo")
        for n, p in text_encoder.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn_like(p) * strength / p.shape[1] ** 0.5
        kwargs["text_encoder_lora_layers"] = {
            formats.canonical("text_encoder", k).split(".", 1)[1]: v
            for k, v in get_peft_model_state_dict(text_encoder, adapter_name="sdlora_demo").items()}
        kwargs["text_encoder_lora_adapter_metadata"] = te_cfg.to_dict()
    out = Path(out)
    StableDiffusionPipeline.save_lora_weights(str(out), **kwargs)
    if had_adapters:
        unet.delete_adapters("sdlora_demo")
    else:
        unet.unload_lora()  # leave the caller's UNet exactly as it was: no empty LoRA wrappers
    if text_encoder is not None:
        recurse_remove_peft_layers(text_encoder)
        del text_encoder.peft_config
    file = out / formats.WEIGHT_NAMES[0]
    with safe_open(str(file), "pt") as f:
        meta, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    meta.update({
        "ss_base_model_version": "sd_v1", "ss_sd_model_name": str(base or "unknown"), "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha or rank), "ss_network_module": "networks.lora", "ss_steps": "0",
        "ss_resolution": "(32, 32)", "ss_learning_rate": "0", "ss_dataset_dirs": "{}",
        "sdlora_version": __version__, "sdlora_target_modules": json.dumps(list(targets)),
    })
    save_safetensors(tensors, file, meta)
    if base is not None:
        write_text(out / "README.md", f"---\nbase_model: {base}\ntags:\n- lora\n- sdlora\n---\n# demo LoRA\n")
    return file


# ---------------------------------------------------------------- CLI

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
    path = formats.resolve_file(args.file)
    d = describe(formats.load_lora(args.file, allow_pickle=args.allow_pickle), path)
    print(json.dumps(d, indent=2)) if args.json else _print_description(d)


def _convert_cli(args):
    _guard(args.out, args.input)
    lora = formats.load_lora(args.input, allow_pickle=args.allow_pickle)
    file = formats.save_lora(lora, args.out, args.to, args.dtype)
    print(f"converted {lora.format} -> {args.to}: {file}")


def _print_kept(kept: dict):
    for name, share in kept.items():
        print(f"  {share * 100:7.2f}%  {name}")
    values = list(kept.values())
    print(f"norm kept: min {min(values) * 100:.2f}%, mean {sum(values) / len(values) * 100:.2f}% "
          f"over {len(values)} layers")


def _resize_cli(args):
    _guard(args.out, args.input)
    lora = formats.load_lora(args.input, allow_pickle=args.allow_pickle)
    small, kept = resize(lora, args.rank)
    file = formats.save_lora(small, args.out, args.to or lora.format, args.dtype)
    print(f"share of each layer's Frobenius norm kept at rank {args.rank}:")
    _print_kept(kept)
    print(f"wrote {file}")


def _merge_cli(args):
    from .pipeline import parse_spec

    if len(args.items) < 2:
        raise UserError("merge needs at least one input LoRA and an output path: A[:w] B[:w] … OUT")
    *specs, out = args.items
    specs = [parse_spec(s) for s in specs]
    _guard(out, *[p for p, _ in specs])
    loras = [(formats.load_lora(p, allow_pickle=args.allow_pickle), w) for p, w in specs]
    merged, kept = merge(loras, args.rank)
    file = formats.save_lora(merged, out, args.to or loras[0][0].format, args.dtype)
    if args.rank:
        print(f"share of each layer's Frobenius norm kept at rank {args.rank}:")
        _print_kept(kept)
    ranks = sorted({m.rank for m in merged.modules.values()})
    print(f"merged {len(loras)} LoRAs (rank {', '.join(map(str, ranks))}) into {file}")


def _extract_cli(args):
    _guard(args.out, args.base, args.tuned)
    lora, kept = extract(args.base, args.tuned, args.rank, text_encoder=not args.unet_only,
                         allow_pickle=args.allow_pickle)
    file = formats.save_lora(lora, args.out, args.to, args.dtype)
    print(f"share of each layer's Frobenius norm kept at rank {args.rank}:")
    _print_kept(kept)
    print(f"extracted {len(lora.modules)} layers into {file}")


def register_cli(sub):
    def common(s, to_default=None, to_required=False):
        s.add_argument("--to", choices=formats.FORMATS, default=to_default, required=to_required,
                       help="output format" + ("" if to_required else " (default: the input's)"))
        s.add_argument("--dtype", choices=list(formats.DTYPES), help="cast the LoRA weights on write")
        s.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt/.ckpt inputs (they can run code)")

    s = sub.add_parser("convert", help="convert a LoRA between diffusers, kohya (A1111/ComfyUI) and peft formats")
    s.add_argument("input")
    s.add_argument("out")
    common(s, to_required=True)
    s.set_defaults(func=_convert_cli)

    s = sub.add_parser("extract", help="a LoRA approximating the difference between two models")
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

    s = sub.add_parser("merge", help="merge weighted LoRAs into one: A[:w] B[:w] … OUT")
    s.add_argument("items", nargs="+", metavar="LORA[:W] … OUT")
    s.add_argument("--rank", type=int, help="SVD-reduce to this rank (default: exact, ranks concatenated)")
    common(s)
    s.set_defaults(func=_merge_cli)

    s = sub.add_parser("resize", help="reduce a LoRA's rank by SVD")
    s.add_argument("input")
    s.add_argument("out")
    s.add_argument("--rank", type=int, required=True)
    common(s)
    s.set_defaults(func=_resize_cli)
