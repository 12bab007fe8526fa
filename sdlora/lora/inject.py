"""LoRA injection (through peft) and the diffusers-format state dict that gets saved.

Both the UNet and the text encoder get their adapter from peft's own `inject_adapter_in_model`,
not from diffusers' or transformers' `add_adapter` wrappers: those gate on their own idea of the
peft version (transformers 5.24 refuses peft < 0.22, which was not even released), and
training must not depend on that.

The saved file is what diffusers' own training scripts write, so an unmodified
`pipe.load_lora_weights(dir)` loads it: keys `unet.<module>.lora.down/up.weight` (and
`text_encoder.text_model.…` — the classic spelling, whatever the installed transformers calls
the module), plus diffusers' `lora_adapter_metadata` so a lora_alpha other than the rank
survives loading.
"""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily so the `sdlora` command starts fast
    import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def text_encoder_targets(num_layers: int, used: int) -> list[str]:
    """TEXT_ENCODER_TARGETS in a CLIP encoder's first `used` layers: SDXL's first text encoder conditions the UNet
    on its penultimate layer, so LoRA on its last layer would get no gradient (and stop DDP). Named from
    `encoder.layers.` on, a suffix peft matches whether transformers spells a `text_model.` level or not."""
    if used >= num_layers:
        return list(TEXT_ENCODER_TARGETS)
    return [f"encoder.layers.{i}.self_attn.{t}" for i in range(used) for t in TEXT_ENCODER_TARGETS]


def lora_config(rank: int, alpha: float | None, targets: list[str], dropout: float = 0.0, rslora: bool = False):
    from peft import LoraConfig

    # "gaussian" init: A random, B zero — the adapter starts as an exact no-op.
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                      init_lora_weights="gaussian", target_modules=targets, use_rslora=rslora)


def file_alpha(rank: int, alpha: float, rslora: bool) -> float:
    """The alpha a file records: loaders scale by alpha/rank, so rsLoRA's alpha/sqrt(rank) is alpha*sqrt(rank)."""
    return alpha * math.sqrt(rank) if rslora else alpha


def add_lora(model: torch.nn.Module, config) -> list[torch.nn.Parameter]:
    """Freeze `model`, inject a LoRA adapter with peft, and return the trainable (LoRA) parameters."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(config, model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no module matched target_modules={config.target_modules}")
    return params


def lora_state_dict(model: torch.nn.Module, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's LoRA weights in diffusers' key layout, prefixed `unet.` / `text_encoder.`."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from .formats import canonical

    # save_embedding_layers=False: LoRA never touches embeddings (and peft stops probing the Hub for a config)
    peft_sd = get_peft_model_state_dict(model, save_embedding_layers=False)
    sd = convert_state_dict_to_diffusers(peft_sd)
    if not all(".lora.down." in k or ".lora.up." in k for k in sd):
        # Targets beyond attention (ff, proj_in, conv) convert only partly, and diffusers then skips
        # the mixed-style layers silently; peft's lora_A/lora_B keys load whole.
        sd = peft_sd
    return {canonical(prefix, k): (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in sd.items()}


def adapter_metadata(configs: dict[str, object]) -> str:
    """diffusers' `lora_adapter_metadata`: each LoraConfig flattened with its component prefix; an rsLoRA config
    as the plain one with the same scale, which every loader (and peft without use_rslora) applies alike."""
    packed = {}
    for prefix, cfg in configs.items():
        fields = cfg.to_dict()
        if fields.get("use_rslora"):
            fields |= {"use_rslora": False, "lora_alpha": file_alpha(cfg.r, cfg.lora_alpha, True),
                       "alpha_pattern": {k: file_alpha(cfg.rank_pattern.get(k, cfg.r), a, True)
                                         for k, a in (cfg.alpha_pattern or {}).items()}}
        for k, v in fields.items():
            packed[f"{prefix}.{k}"] = sorted(v) if isinstance(v, set) else v
    return json.dumps(packed, indent=2, sort_keys=True, default=str)


def count_params(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state_dict.values())
