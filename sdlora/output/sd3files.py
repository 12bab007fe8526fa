"""An SD3 / 3.5 run's LoRA file: diffusers' SD3 layout, which an unmodified StableDiffusion3Pipeline.load_lora_weights
reads (`transformer.<peft key>`, `text_encoder.` / `text_encoder_2.` for the CLIPs) with the peft configs in the
`lora_adapter_metadata` header, and which ComfyUI reads as it is (comfy/lora.py maps diffusers' `transformer.` keys
onto its MMDiT for SD3). One file: kohya's sd3_train_network writes SAI's fused-qkv MMDiT names instead, which
ComfyUI reads too; converting to them is left to `sdlora convert` (not yet for SD3)."""
from __future__ import annotations

from ..io import save_safetensors
from ..lora import inject
from ..lora.formats import canonical
from . import weights

# sdlora's part name for the denoiser -> the component prefix diffusers' SD3 loader reads
PREFIX = {"unet": "transformer"}


def state_dict(model, comp: str, dtype=None) -> dict:
    """A peft model's LoRA weights as diffusers' SD3 file holds them: peft's own lora_A / lora_B keys, prefixed."""
    from peft.utils import get_peft_model_state_dict

    prefix = PREFIX.get(comp, comp)
    sd = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {canonical(prefix, k): (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in sd.items()}


def save(path, parts: dict, info: dict, dtype=None) -> tuple[dict, dict]:
    """Write `parts` ({"unet": (transformer, LoraConfig, None), "text_encoder": …}) to `path`; returns (tensors,
    header)."""
    sd, configs = {}, {}
    for comp, (model, config, _) in parts.items():
        sd.update(state_dict(model, comp, dtype))
        configs[PREFIX.get(comp, comp)] = inject.file_config(config)
    meta = {"format": "pt", **weights.header(info), "lora_adapter_metadata": inject.adapter_metadata(configs)}
    save_safetensors(sd, path, meta)
    return sd, meta
