"""diffusers' layout, written in the one key spelling that diffusers' `load_lora_weights` and ComfyUI's loader both
read whole; read in every spelling diffusers has used.

ComfyUI (comfy/lora.py `model_lora_keys_unet`, as Forge copies it) knows a diffusers UNet layer only by
``unet.<path>`` with every ``.to_`` spelled ``.processor.to_`` and ``to_out.0`` as ``to_out`` — diffusers'
attention-processor names — so peft's ``unet.….attn1.to_q.lora_A.weight`` reaches no layer (0 of 256 in an
SD 1.5 attention LoRA). diffusers still reads those processor names: a UNet state dict whose first key is not
peft's (no ``lora_A``) goes through `convert_unet_state_dict_to_peft`, which drops ``.processor.`` and maps
``to_q_lora.down`` / ``to_out_lora.down`` / ``.lora.down`` to peft's names. So (`to_shared`):

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
from pathlib import Path

from ...errors import UserError
from .checks import check_tensors, json_value, show
from .files import WEIGHTS_NAME, write_weights
from .layers import Lora, peft_magnitude
from .names import (canonical, config_path, diffusers_keys, magnitude_key, module_path, old_processor_path,
                    unet_keys, unet_stem)
from .peftconfig import Alphas, check_config, peft_config_dict
from .reading import FACTORS, add, alpha_table, assemble

NAME = "diffusers"
CONFIG_FILE = None  # the peft configs travel in the header (lora_adapter_metadata)
_COMPONENT = "(unet|transformer|text_encoder|text_encoder_2)"  # transformer: SD3's MMDiT


def detect(keys: list[str]) -> bool:
    return all(k.startswith(("unet.", "transformer.", "text_encoder.", "text_encoder_2.")) for k in keys)


def read(tensors: dict, metadata: dict, source, config: dict | None = None):
    slots = {}
    for k, t in tensors.items():
        if k.endswith(".alpha"):
            continue
        if f := re.fullmatch(rf"{_COMPONENT}\.(.+)\.({FACTORS}|dora_scale)", k):  # LoHa/LoKr
            add(slots, canonical(f.group(1), module_path(f.group(2))),
                "magnitude" if f.group(3) == "dora_scale" else f.group(3), t, k, source)
            continue
        m = re.fullmatch(rf"{_COMPONENT}\.(.+?)\.(?:lora_linear_layer\.|lora\.)?"
                         r"(?:(down|up|lora_A|lora_B)(?:\.\w+)?\.weight|(lora_magnitude_vector)(?:\.weight)?)", k)
        if not m:
            raise UserError(f"{source}: unsupported diffusers LoRA key {show(k)} (bias is not supported); "
                            "expected ….lora.down/up.weight, ….lora_A/lora_B.weight (and DoRA's ….lora_magnitude_vector)")
        which = "magnitude" if m.group(4) else "up" if m.group(3) in ("up", "lora_B") else "down"
        add(slots, canonical(m.group(1), old_processor_path(m.group(2))), which, t, k, source)
    table = alpha_table(tensors, rf"{_COMPONENT}\.(.+)\.alpha", lambda c, p: canonical(c, module_path(p)), source)
    what = "lora_adapter_metadata header"
    return assemble(NAME, slots, Alphas(table, _configs(metadata, what, source), what, source), metadata, source)


def _configs(metadata: dict, what: str, source) -> dict:
    """{component: its peft config} from the header's `lora_adapter_metadata` (diffusers packs them as
    "<component>.<field>": value), checked."""
    configs = {}
    if metadata.get("lora_adapter_metadata"):
        packed = json_value(metadata["lora_adapter_metadata"], what, source)
        if not isinstance(packed, dict):
            raise UserError(f"{source}: its {what} is not a JSON object; the file is damaged (re-export it)")
        for key, value in packed.items():
            comp, _, field_ = key.partition(".")
            configs.setdefault(comp, {})[field_] = value
    for comp, cfg in configs.items():
        check_config(cfg, f"{what} ({comp})", source)
    return configs


def paths(folder: Path) -> list[Path]:
    """The files `write` puts in a folder."""
    return [folder / WEIGHTS_NAME]


def write(lora, out: Path, header: dict, dtype) -> Path:
    """`lora` as one diffusers file: `out` itself (…safetensors) or in the folder `out`."""
    file = out if out.suffix == ".safetensors" else paths(out)[0]
    tensors, extra = diffusers_tensors(lora)
    tensors, extra = to_shared(tensors, {**header, **extra}, str(file))
    return write_weights(lora, out, file, tensors, {**header, **extra}, dtype)


def diffusers_tensors(lora) -> tuple[dict, dict]:
    """`lora` in diffusers' own key layout (as its training scripts write it), and its header entries
    (`lora_adapter_metadata`)."""
    tensors, packed = {}, {}
    for comp in lora.components():
        mods = lora.component(comp)
        down, up = diffusers_keys(comp)
        for p, m in mods.items():
            if m.kind != "lora":  # LyCORIS's factor names under diffusers' prefixes, with each layer's alpha
                tensors.update({f"{comp}.{p}.{k}": v for k, v in m.factors.items()})
                if m.alpha is not None:
                    tensors[f"{comp}.{p}.alpha"] = _alpha_tensor(m.alpha)
                if m.magnitude is not None:
                    tensors[f"{comp}.{p}.dora_scale"] = m.magnitude
                continue
            tensors[f"{comp}.{p}.{down}.weight"] = m.down
            tensors[f"{comp}.{p}.{up}.weight"] = m.up
            if m.magnitude is not None:
                tensors[f"{comp}.{p}.{magnitude_key(comp)}"] = peft_magnitude(m)
        plain = {config_path(comp, p): m for p, m in mods.items() if m.kind == "lora"}
        if plain:
            packed.update({f"{comp}.{k}": v for k, v in peft_config_dict(plain).items()})
    return tensors, {"lora_adapter_metadata": json.dumps(packed, sort_keys=True)} if packed else {}


def _alpha_tensor(alpha: float):
    import torch

    return torch.tensor(float(alpha))


def to_shared(tensors: dict, header: dict, source: str = "<memory>") -> tuple[dict, dict]:
    """A LoRA in diffusers' own layout (tensors and header, as `diffusers_tensors` and sdlora's training write them)
    respelled so ComfyUI reads every layer at the trained scale while diffusers' `load_lora_weights` loads the same
    weights: see the module docstring."""
    check_tensors(tensors, source)
    lora = read(tensors, header, source)
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
            down_key, up_key = (f"{comp}.{path}.{w}.weight" for w in diffusers_keys(comp))
        out[down_key], out[up_key] = m.down, up
        if m.magnitude is not None:
            out[f"{comp}.{path}.{magnitude_key(comp)}"] = peft_magnitude(m)
    if products:  # LyCORIS' factor names and alphas (which diffusers cannot read anyway) under ComfyUI's layer names
        for key, t in diffusers_tensors(Lora(products))[0].items():
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
            packed.pop(f"{comp}.use_rslora", None)  # off: peft's default (file_config leaves defaults out)
            if rank_pattern := packed.get(f"{comp}.rank_pattern"):
                packed[f"{comp}.alpha_pattern"] = dict(rank_pattern)
            else:
                packed.pop(f"{comp}.alpha_pattern", None)
    out = dict(header)
    if packed:
        out["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True)
    return out
