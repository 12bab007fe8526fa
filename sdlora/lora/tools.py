"""LoRA file tools: describe, resize (SVD), merge, extract. The `sdlora` subcommands over them live in sdlora.cli."""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..models import TEXT_CLASSES, TEXT_ENCODERS, no_safetensors
from . import formats
from .formats import Lora, Module

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------- inspect

def describe(lora: Lora, path=None) -> dict:
    mods = lora.modules.values()
    ranks = collections.Counter(m.rank for m in mods if m.rank)
    # a LoKr layer kept at scale 1 (alpha folded into lokr_w1) has alpha = its rank, as its file's header says
    alphas = collections.Counter(m.alpha if m.alpha is not None else m.rank for m in mods if m.alpha or m.rank)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for m in mods
                     for t in ((m.down, m.up) if m.kind == "lora" else m.factors.values())})
    per_comp = collections.Counter(n.split(".", 1)[0] for n in lora.modules)
    size = Path(path).stat().st_size if path and Path(path).is_file() else None
    return {
        "file": str(path or lora.source), "format": lora.format, "base_model": lora.base_model,
        "architecture": formats.family(lora), "components": dict(per_comp),
        "ranks": sorted(ranks), "alphas": sorted(alphas), "target_modules": len(lora.modules),
        "parameters": sum(m.parameters() for m in mods),
        "layer_types": dict(collections.Counter(formats.LYCORIS_NAMES.get(m.kind, "LoRA") for m in mods)),
        "dtype": dtypes, "size_bytes": size,
        "conv_layers": sum(m.kind == "lora" and m.down.dim() == 4 for m in mods),
        "dora_layers": sum(m.magnitude is not None for m in mods),
        "metadata": {k: _safe(v) for k, v in sorted(lora.metadata.items())},
    }


def _safe(value: str) -> str:
    """Metadata is free text: never echo something that looks like an access token."""
    return re.sub(r"\b(hf_|ghp_|sk-)[A-Za-z0-9_-]{16,}", r"\1<redacted>", str(value))


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
    root = (s[:rank] / scale).sqrt()
    up = (u[:, :rank] * root).reshape(out_dim, rank, *([1, 1] if len(shape_in) == 3 else []))
    down = (root[:, None] * vh[:rank]).reshape(rank, *shape_in)
    return Module(down.to(dtype).contiguous(), up.to(dtype).contiguous(), float(rank * scale))


def plain_only(lora: Lora, what: str):
    """resize/merge work on B A alone; a DoRA layer's change also depends on the base weight it renormalises, and
    LoHa/LoKr layers have no B A (a conv layer's kernel size is not even in the file)."""
    kinds = {m.kind for m in lora.modules.values()} - {"lora"}
    if kinds:
        name = formats.LYCORIS_NAMES[kinds.pop()]
        raise UserError(f"{lora.source}: a {name} file; {what} supports plain LoRA (and LoCon) files only — sdlora's "
                        f"loader (sdlora generate, load_pipeline) and `sdlora fuse` apply {name} layers")
    if any(m.magnitude is not None for m in lora.modules.values()):
        raise UserError(f"{lora.source}: a DoRA LoRA; {what} supports plain LoRA (and LoCon) files only, since a "
                        "DoRA layer's change depends on the base weights")


def resize(lora: Lora, rank: int):
    """Reduce every layer to at most `rank` by SVD; returns (new LoRA, {layer: share of Frobenius norm kept})."""
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    plain_only(lora, "resize")
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

    for lo, _ in loras:
        plain_only(lo, "merge")
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


def extract(base, tuned, rank: int, text_encoder: bool = True, min_change: float = 1e-6, allow_pickle: bool = False,
            base_config=None):
    """A LoRA approximating tuned - base for every Linear/Conv2d that differs (UNet, and the text encoders both
    models have unless text_encoder=False); returns (LoRA, kept shares). Either model may be a single-file
    checkpoint, loaded with `base_config` (bases.load)."""
    import torch

    from ..logs import quiet

    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    single = {m: _single(m, base_config, allow_pickle) for m in (base, tuned)}  # checked before any weights load
    if base_config and not any(single.values()):
        raise UserError(f"--base_config is for single-file checkpoints; {base} and {tuned} hold their own configs: "
                        f"drop --base_config")
    modules, kept = {}, {}
    denoiser = "transformer" if _is_sd3(base) else "unet"  # SD3: the MMDiT, and its two CLIPs (T5 takes no LoRA)
    for comp in (denoiser, *TEXT_ENCODERS) if text_encoder else (denoiser,):
        with quiet():
            a, b = (_component(m, comp, allow_pickle, single[m]) for m in (base, tuned))
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


def _is_sd3(model) -> bool:
    """Whether a pipeline folder or Hub id is an SD3 / 3.5 one (its model_index.json; a single file is not)."""
    from ..models import family

    return family(str(model)) == "sd3"


def _single(model, base_config, allow_pickle: bool):
    """(file, configs, family) for a single-file checkpoint, else None; --base_config is for single files only."""
    from ..bases import detect, load

    if not detect.is_single_file(str(model)):
        return None
    return load.for_pipeline(model, base_config, allow_pickle)


def _component(model, comp, allow_pickle: bool = False, single=None):
    """A pipeline folder's (or a single file's: `single`, from `_single`) UNet or text encoder; None for a text
    encoder the model does not have (SDXL's second one in an SD 1.x/2.x folder)."""
    import torch
    import transformers
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from .. import sd3base

    classes = sd3base.TEXT_CLASSES if _is_sd3(model) else TEXT_CLASSES
    cls = {"unet": UNet2DConditionModel, "transformer": SD3Transformer2DModel}.get(comp) or \
        getattr(transformers, classes[comp])
    if single:
        from ..bases import ldm, load

        path, configs, family = single
        if comp not in ("unet", *ldm.TEXT[family]):
            return None
        return load.component(cls, path, comp, configs, torch.float32, allow_pickle)
    try:  # safetensors only unless the user opts in: pickle weights can run code
        return cls.from_pretrained(str(model), subfolder=comp, use_safetensors=None if allow_pickle else True)
    except Exception as e:
        if comp.startswith("text_encoder") and not (Path(str(model)) / comp).exists() and Path(str(model)).exists():
            return None
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        hint = formats.PICKLE_BASE_HINT if no_safetensors(reason) and not allow_pickle else \
            "expected a diffusers Stable Diffusion folder or Hub id"
        raise UserError(f"{model}: could not load its {comp} ({reason}); {hint}") from None
