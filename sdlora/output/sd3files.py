"""An SD3 / 3.5 run's LoRA file: diffusers' SD3 layout, which an unmodified StableDiffusion3Pipeline.load_lora_weights
reads (`transformer.<peft key>`, `text_encoder.` / `text_encoder_2.` for the CLIPs) with the peft configs in the
`lora_adapter_metadata` header, and which ComfyUI reads as it is (comfy/lora.py maps diffusers' `transformer.` keys
onto its MMDiT for SD3). One file: kohya's sd3_train_network writes SAI's fused-qkv MMDiT names instead, which
ComfyUI reads too; converting to them is left to `sdlora convert` (not yet for SD3)."""
from __future__ import annotations

from ..io import save_safetensors
from ..lora import formats, inject
from ..lora.formats import canonical
from . import weights

# sdlora's part name for the denoiser -> the component prefix diffusers' SD3 loader reads
PREFIX = {"unet": "transformer"}


def state_dict(model, comp: str, dtype=None, initial: dict | None = None) -> dict:
    """A peft model's LoRA weights as diffusers' SD3 file holds them: peft's own lora_A / lora_B keys (DoRA's
    lora_magnitude_vector beside them), prefixed. With `initial` (PiSSA/OLoRA's `inject.initial_weights`), the change
    from the unmodified base, B A - B0 A0, as one LoRA of twice the rank [B, -B0] @ [A; A0], as the SD1/SDXL file."""
    import torch
    from peft.utils import get_peft_model_state_dict

    prefix = PREFIX.get(comp, comp)
    sd = get_peft_model_state_dict(model, save_embedding_layers=False)
    for name, (a0, b0) in (initial or {}).items():
        a, b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        sd[a], sd[b] = torch.cat([sd[a], a0.to(sd[a].dtype)], 0), torch.cat([sd[b], -b0.to(sd[b].dtype)], 1)
    if prefix != "transformer":  # DoRA: the spelling diffusers' text-encoder loader reads (as in the SD1/SDXL file)
        sd = {k + ".weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in sd.items()}
    return {canonical(prefix, k): (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in sd.items()}


def save(path, parts: dict, info: dict, dtype=None) -> tuple[dict, dict]:
    """Write `parts` ({"unet": (transformer, LoraConfig, initial weights or None), "text_encoder": …}) to `path`;
    returns (tensors, header). LoHa/LoKr layers as LyCORIS's factors (sdlora's loader, ComfyUI; not diffusers')."""
    sd, configs, products = {}, {}, {}
    for comp, (model, config, initial) in parts.items():
        kind = str(config.peft_type.value)
        if kind in ("LOHA", "LOKR"):  # LyCORIS's factor names under diffusers' prefixes, as weights.save writes them
            mods = inject.product_modules(model, PREFIX.get(comp, comp), dtype)
            products.update(mods)
            sd.update(formats.diffusers_tensors(formats.Lora(mods))[0])
            continue
        sd.update(state_dict(model, comp, dtype, initial))
        configs[PREFIX.get(comp, comp)] = inject.file_config(config, converted=initial is not None)
    meta = {"format": "pt", **weights.header(info), "lora_adapter_metadata": inject.adapter_metadata(configs)}
    if products:  # LoKr layers are written at scale 1 (alpha folded into lokr_w1): the header says what they hold
        meta.update(formats.network_header(formats.Lora(products)))
    save_safetensors(sd, path, meta)
    return sd, meta
