"""LoRAs stacked on a diffusers pipeline as named peft adapters, each checked against the base before any is applied.

sdlora reads each LoRA itself (any format) and hands diffusers' `load_lora_weights` a plain peft-keyed dict with
alpha/rank folded into B, so every format lands with exactly the scale it was saved with; `set_adapters` applies
the user's weights. What sdlora knows of the stack (each adapter's path, weight and format, the base) lives in an
`Adapters` held by whoever loaded the pipeline: the pipeline stays an unmodified diffusers one.
"""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

from ..errors import UserError
from ..logs import quiet
from ..lora import formats
from ..models import TEXT_ENCODERS
from .images import denoiser

COMPONENTS = ("unet", *TEXT_ENCODERS)


def parse_spec(spec) -> tuple[str, float]:
    """'path[:weight]' (or (path, weight)) -> (path, weight); a Windows drive colon is not a weight. A weight
    that is not a finite number (nan, inf) is a one-line error: it would draw noise or black images."""
    if isinstance(spec, (tuple, list)):
        return str(spec[0]), lora_weight(spec[1], spec[0])
    spec = str(spec)
    head, sep, tail = spec.rpartition(":")
    if sep and head and not re.fullmatch(r"[A-Za-z]", head):
        try:
            weight = float(tail)
        except ValueError:
            pass
        else:
            return head, lora_weight(weight, head)
    return spec, 1.0


def lora_weight(weight, source) -> float:
    """A LoRA's weight as a float: finite, else a one-line UserError naming the LoRA."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{source}:{weight}: the LoRA's weight must be a finite number (e.g. {source}:0.8)")
    return value


class Adapters:
    """The LoRAs sdlora stacked on `pipe`, by adapter name: {"path", "weight", "format"} each (what an image's PNG
    records), and the `base` the pipeline was loaded from."""

    def __init__(self, pipe, base: str | None = None):
        self.pipe = pipe
        self.base = base
        self.loaded: dict[str, dict] = {}
        self.clip_skip: int | None = None  # the first LoRA's recorded clip skip (ss_clip_skip), to draw with

    def add(self, loras) -> list[str]:
        """Stack [(Lora | path, weight)] as named adapters; all are checked before any is applied, and a failure
        leaves the stack as it was. Returns the names of all sdlora's adapters, now active at their weights."""
        pipe = self.pipe
        loras = [(lo, lora_weight(w, getattr(lo, "source", lo))) for lo, w in loras]
        loras = [(formats.load_lora(lo) if not isinstance(lo, formats.Lora) else lo, w) for lo, w in loras]
        for lora, _ in loras:
            check_fits(pipe, lora)
        added = []
        taken = set(self.loaded) | {a for names in pipe.get_list_adapters().values() for a in names}
        try:
            for lora, weight in loras:
                name = _adapter_name(lora.source, taken)
                added.append(name)
                taken.add(name)
                with quiet():
                    pipe.load_lora_weights(_peft_dict(lora, pipe), adapter_name=name)
                self.loaded[name] = {"path": lora.source, "weight": weight, "format": lora.format}
                if self.clip_skip is None and str(lora.metadata.get("ss_clip_skip", "")).isdigit():
                    self.clip_skip = int(lora.metadata["ss_clip_skip"])
        except Exception as e:
            for name in added:  # undo this call's adapters, including one that failed half-way
                self.loaded.pop(name, None)
                with contextlib.suppress(Exception):
                    pipe.delete_adapters(name)
            if isinstance(e, UserError):
                raise
            raise UserError(f"{lora.source}: diffusers could not load the LoRA ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:160]})") from None
        if self.loaded:
            pipe.set_adapters(list(self.loaded), [v["weight"] for v in self.loaded.values()])
        return list(self.loaded)

    def clear(self):
        """Delete every adapter this stack added: the pipeline is its base again."""
        for name in list(self.loaded):
            self.pipe.delete_adapters(name)
            self.loaded.pop(name)

    def records(self) -> list[dict]:
        """The stack as an image's parameters record it: [{"name", "path", "weight", "format"}]."""
        return [{"name": n, **v} for n, v in self.loaded.items()]


def _adapter_name(source: str, taken) -> str:
    """The adapter name for a LoRA: its file stem (its folder's name for a standard weights file), made unique."""
    p = Path(source)
    stem = p.parent.name if p.name in formats.WEIGHT_NAMES else p.stem
    base = re.sub(r"\W", "_", stem) or "lora"
    import torch

    if hasattr(torch.nn.Module, base):  # peft sets the adapter name as an attribute: "train", "eval", "to" clash
        base += "_lora"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _peft_dict(lora: formats.Lora, pipe) -> dict:
    """Keys diffusers loads as-is (formats.diffusers_keys); alpha/rank is folded into B so the adapter's own
    scale is 1. LoHa/LoKr layers, which diffusers cannot read, go in as the plain LoRA with exactly their change
    (lycoris.Product.as_lora)."""
    out, dtype = {}, denoiser(pipe).dtype
    for name, m in lora.modules.items():
        comp, path = name.split(".", 1)
        key = f"{comp}.{formats.live_path(comp, path, getattr(pipe, comp))}"
        a, b = formats.diffusers_keys(comp)
        if m.kind != "lora":
            down, up, alpha = m.as_lora(_layer(pipe, comp, path).weight.shape)
            m = formats.Module(down, up, alpha, m.magnitude if m.magnitude is None else m.magnitude.flatten())
        out[f"{key}.{a}.weight"] = m.down.to(dtype)
        out[f"{key}.{b}.weight"] = (m.up.float() * (m.alpha / m.rank)).to(dtype)
        if m.magnitude is not None:
            out[f"{key}.{formats.magnitude_key(comp)}"] = formats.peft_magnitude(m).to(dtype)
    return out


def _layer(pipe, comp: str, path: str):
    layer = getattr(pipe, comp).get_submodule(formats.live_path(comp, path, getattr(pipe, comp)))
    return getattr(layer, "base_layer", layer)


def base_family(pipe) -> str:
    return formats.unet_family(denoiser(pipe).config, type(pipe).__name__)


def check_fits(pipe, lora: formats.Lora):
    """Raise a one-line UserError unless every LoRA layer exists in `pipe` with matching shape."""
    import torch

    def fail(detail):
        raise UserError(f"{lora.source}: LoRA for {formats.family(lora)} does not fit the base model "
                        f"({base_family(pipe)}): {detail}")

    for name, m in lora.modules.items():
        comp, path = name.split(".", 1)
        model = getattr(pipe, comp, None)
        if model is None:
            fail(f"the base has no {comp}")
        try:
            layer = model.get_submodule(formats.live_path(comp, path, model))
        except AttributeError:
            fail(f"no layer '{name}' in the base")
        layer = getattr(layer, "base_layer", layer)
        w = getattr(layer, "weight", None)
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or w is None:
            fail(f"'{name}' is a {type(layer).__name__}, expected Linear or Conv2d")
        if m.kind != "lora":  # LoHa/LoKr factors hold a conv kernel in their flattened input axis
            if (w.shape[0], w[0].numel()) != (m.out_features, m.in_features):
                fail(f"layer '{name}' has weight shape {list(w.shape)}, the {formats.LYCORIS_NAMES[m.kind]} layer expects "
                     f"[{m.out_features}, {m.in_features}] (inputs × kernel)")
            continue
        want = (m.up.shape[0], *m.down.shape[1:])
        if tuple(w.shape) != tuple(want) or (m.up.dim() == 4 and tuple(m.up.shape[2:]) != (1, 1)):
            fail(f"layer '{name}' has weight shape {list(w.shape)}, the LoRA expects {list(want)}")


# ---------------------------------------------------------------- fusing

def fuse_loras(pipe, unload: bool = False) -> dict:
    """Bake the active adapters (at their weights) into the base weights for base-model speed.

    unload=True also drops the LoRA layers (nothing to unfuse afterwards): what `generate --fuse` and
    `sdlora fuse` want. Otherwise returns the base weights the fused layers had, for `unfuse_loras`."""
    originals = {}
    for comp in _lora_components(pipe):
        for name, m in getattr(pipe, comp).named_modules():
            if hasattr(m, "base_layer") and hasattr(m, "lora_A") and not unload:
                originals[(comp, name)] = m.base_layer.weight.detach().to("cpu", copy=True)
    with quiet():
        pipe.fuse_lora(components=_lora_components(pipe), adapter_names=pipe.get_active_adapters())
        if unload:
            pipe.unload_lora_weights()  # after fusing this keeps the merged weights and drops the LoRA layers
    return originals


def unfuse_loras(pipe, originals: dict):
    """Undo `fuse_loras`, restoring the base weights bit for bit from what it returned (peft's unmerge subtracts,
    which is not bit-exact)."""
    pipe.unfuse_lora(components=_lora_components(pipe))
    for (comp, name), w in originals.items():
        getattr(pipe, comp).get_submodule(name).base_layer.weight.data.copy_(w)


def _lora_components(pipe):
    return [c for c in COMPONENTS if getattr(getattr(pipe, c, None), "peft_config", None)]
