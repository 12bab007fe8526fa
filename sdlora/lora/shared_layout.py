"""The diffusers file in the one key spelling that diffusers' `load_lora_weights` and ComfyUI's loader both read whole.

ComfyUI (comfy/lora.py `model_lora_keys_unet`, as Forge copies it) knows a diffusers UNet layer only by
``unet.<path>`` with every ``.to_`` spelled ``.processor.to_`` and ``to_out.0`` as ``to_out`` — diffusers'
attention-processor names — so peft's ``unet.….attn1.to_q.lora_A.weight`` reaches no layer (0 of 256 in an
SD 1.5 attention LoRA). diffusers still reads those processor names: a UNet state dict whose first key is not
peft's (no ``lora_A``) goes through `convert_unet_state_dict_to_peft`, which drops ``.processor.`` and maps
``to_q_lora.down`` / ``to_out_lora.down`` / ``.lora.down`` to peft's names. So:

* UNet attention projections: ``unet.<block>.processor.to_q_lora.down.weight`` (``to_out_lora`` for to_out.0),
  the spelling diffusers' own kohya conversion produces and ComfyUI has read since its first LoRA loader;
* other UNet layers (LoCon convs, proj_in, ff, time_emb_proj): ``unet.<path>.lora.down/up.weight``;
* text encoders: ``text_encoder(_2).text_model.….lora_linear_layer.down/up.weight``, as before (both read it).

Alpha cannot travel as a tensor: ComfyUI reads ``<layer>.alpha``, but diffusers refuses any key without "lora"
in its name ("Invalid LoRA checkpoint"). So each layer's alpha / rank is folded into its up weight and the
`lora_adapter_metadata` header says alpha = rank: every loader then applies scale 1 to the same product,
which is the trained change (ComfyUI with no alpha uses 1.0). DoRA magnitudes keep peft's key (diffusers reads
it; ComfyUI reads only LyCORIS's ``dora_scale``, which diffusers drops with a warning, so ComfyUI applies a DoRA
layer's direction without its magnitude — `sdlora inspect` says so). LoHa/LoKr layers keep LyCORIS' factor names
and alpha tensors (diffusers reads neither) under the same layer names, so ComfyUI reads them whole too.
"""
from __future__ import annotations

import json
import re

from . import formats


def unet_stem(path: str) -> str:
    """The name ComfyUI's key map gives a diffusers UNet path (``.to_`` -> ``.processor.to_``, no ``to_out``'s .0)."""
    stem = path.replace(".to_", ".processor.to_")
    return stem[:-2] if stem.endswith(".to_out.0") else stem


def unet_keys(path: str) -> tuple[str, str]:
    """(down, up) key names of a plain UNet LoRA layer that both loaders read."""
    stem = "unet." + unet_stem(path)
    if re.search(r"\.processor\.to_(q|k|v|out)$", stem):  # diffusers maps these old names, and only these
        return f"{stem}_lora.down.weight", f"{stem}_lora.up.weight"
    return f"{stem}.lora.down.weight", f"{stem}.lora.up.weight"


def to_shared(tensors: dict, header: dict, source: str = "<memory>") -> tuple[dict, dict]:
    """A diffusers-layout LoRA (tensors and header, as sdlora writes them) respelled so ComfyUI reads every layer at
    the trained scale while diffusers' `load_lora_weights` loads the same weights: see the module docstring."""
    lora = formats.parse(tensors, header, source=source)
    out, products = {}, {}
    for name, m in lora.modules.items():
        comp, path = name.split(".", 1)
        if m.kind != "lora":
            products[name] = m
            continue
        up = m.up if m.alpha == m.rank else (m.up.float() * (m.alpha / m.rank)).to(m.up.dtype)
        if comp == "unet":
            down_key, up_key = unet_keys(path)
        else:
            down_key, up_key = (f"{comp}.{path}.{w}.weight" for w in formats.diffusers_keys(comp))
        out[down_key], out[up_key] = m.down, up
        if m.magnitude is not None:
            out[f"{comp}.{path}.{formats.magnitude_key(comp)}"] = formats.peft_magnitude(m)
    if products:  # LyCORIS' factor names and alphas (which diffusers cannot read anyway) under ComfyUI's layer names
        for key, t in formats.diffusers_tensors(formats.Lora(products))[0].items():
            comp, rest = key.split(".", 1)
            path, _, what = rest.rpartition(".")
            out[f"{comp}.{unet_stem(path) if comp == 'unet' else path}.{what}"] = t
    return out, _unit_alphas(header, {n.split(".", 1)[0] for n, m in lora.modules.items() if m.kind == "lora"})


def _unit_alphas(header: dict, comps: set[str]) -> dict:
    """`header` with each plain-LoRA component's peft config at alpha = rank (its scale now lives in the weights)."""
    packed = json.loads(header.get("lora_adapter_metadata") or "{}")
    for comp in comps:
        if f"{comp}.r" in packed:
            packed[f"{comp}.lora_alpha"] = packed[f"{comp}.r"]
            packed[f"{comp}.alpha_pattern"] = dict(packed.get(f"{comp}.rank_pattern") or {})
            packed[f"{comp}.use_rslora"] = False
    out = dict(header)
    if packed:
        out["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True)
    return out
