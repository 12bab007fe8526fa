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

import dataclasses
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


LORA_TYPES = ("lora", "dora", "loha", "lokr")


def lora_config(rank: int, alpha: float | None, targets: list[str], dropout: float = 0.0, rslora: bool = False,
                init: str = "gaussian", dora: bool = False, kind: str = "lora"):
    """peft's config for one adapter type: LoraConfig (lora, dora), LoHaConfig, LoKrConfig."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    alpha = alpha if alpha is not None else rank
    if kind == "loha":  # peft's and LyCORIS's defaults: no rank/module dropout, factors as LyCORIS names them
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets)
    if kind == "lokr":  # factor -1: each side split near its square root, as LyCORIS's default
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, decompose_factor=-1)
    # "gaussian" init: A random, B zero — the adapter starts as an exact no-op. "pissa" / "olora": A and B start
    # from the layer's own weight, which peft takes out of the frozen weight (so the model is unchanged too).
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                      init_lora_weights=init, target_modules=targets, use_rslora=rslora, use_dora=dora)


def file_rank_alpha(rank: int, alpha: float, rslora: bool = False, converted: bool = False) -> tuple[int, float]:
    """The rank and alpha a saved file records. Loaders scale by alpha/rank, so rsLoRA's alpha/sqrt(rank) is
    written as alpha*sqrt(rank); a PiSSA/OLoRA adapter saved as a change from the unmodified base has twice the
    rank (`lora_state_dict`) at the same scale."""
    if not (rslora or converted):
        return rank, alpha
    r = rank * 2 if converted else rank
    file_alpha = (alpha / math.sqrt(rank) if rslora else alpha / rank) * r
    return r, int(round(file_alpha)) if abs(file_alpha - round(file_alpha)) < 1e-9 else file_alpha


def initial_weights(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted layer's (A, B) as injected: for PiSSA/OLoRA, the part of the weight the frozen base gave up."""
    return {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def add_lora(model: torch.nn.Module, config) -> list[torch.nn.Parameter]:
    """Freeze `model`, inject a LoRA adapter with peft, and return the trainable (LoRA) parameters."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(config, model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no module matched target_modules={config.target_modules}")
    return params


def lora_state_dict(model: torch.nn.Module, prefix: str, dtype: torch.dtype | None = None,
                    initial: dict | None = None) -> dict[str, torch.Tensor]:
    """The model's LoRA weights in diffusers' key layout, prefixed `unet.` / `text_encoder.`. With `initial`
    (PiSSA/OLoRA's `initial_weights`), the change from the unmodified base, B A - B0 A0, written as one LoRA of
    twice the rank, [B, -B0] @ [A; A0] (peft's own conversion), so it applies to the base everyone has."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from .formats import canonical

    # save_embedding_layers=False: LoRA never touches embeddings (and peft stops probing the Hub for a config)
    peft_sd = get_peft_model_state_dict(model, save_embedding_layers=False)
    for name, (a0, b0) in (initial or {}).items():
        a, b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        peft_sd[a] = torch.cat([peft_sd[a], a0.to(peft_sd[a].dtype)], 0)
        peft_sd[b] = torch.cat([peft_sd[b], -b0.to(peft_sd[b].dtype)], 1)
    sd = convert_state_dict_to_diffusers(peft_sd)
    if not all(".lora.down." in k or ".lora.up." in k for k in sd):
        # Targets beyond attention (ff, proj_in, conv) convert only partly, and diffusers then skips
        # the mixed-style layers silently; peft's lora_A/lora_B keys load whole.
        sd = peft_sd
    if prefix not in ("unet", "transformer"):  # DoRA: the spelling diffusers' text-encoder loader reads (magnitude_key)
        sd = {k + ".weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in sd.items()}
    return {canonical(prefix, k): (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in sd.items()}


def product_modules(model: torch.nn.Module, prefix: str, dtype: torch.dtype | None = None) -> dict:
    """A peft LoHa/LoKr model's layers as sdlora's `lycoris.Product`s ({`unet.…`: layer}), LoKr folded to scale 1;
    formats.diffusers_tensors writes them as LyCORIS's factor names under `unet.` / `text_encoder.`."""
    from .formats import canonical
    from .lycoris import KEYS, Product, fold_scale

    modules = {}
    for name, m in model.named_modules():
        kind = "loha" if hasattr(m, "hada_w1_a") else "lokr" if hasattr(m, "lokr_w1") else None
        if kind is None or "default" not in getattr(m, "scaling", {}):
            continue
        factors = {k: getattr(m, k)["default"].detach() for k in KEYS[kind] if "default" in getattr(m, k, {})}
        scale = m.scaling["default"]
        p = Product(kind, {k: (v.to(dtype) if dtype else v).cpu().contiguous() for k, v in factors.items()},
                    scale * m.r["default"])
        modules[canonical(prefix, name)] = fold_scale(p, scale) if kind == "lokr" else p
    return modules


# The entries every file's config keeps; any other entry is written only where it differs from peft's default.
CORE_CONFIG = ("peft_type", "r", "lora_alpha", "target_modules", "init_lora_weights")


def file_config(cfg, converted: bool = False) -> dict:
    """A LoraConfig as a saved file records it: plain LoRA with the same scale (`file_rank_alpha`), which every
    loader, and peft without use_rslora or PiSSA, applies alike. Entries at peft's defaults are left out: diffusers
    loads the file with LoraConfig(**entries), and a peft older than the writer's refuses a keyword it lacks (peft
    0.22 added astra_config, 0.18 peft_version), while a missing entry takes the same default in every version."""
    r, alpha = file_rank_alpha(cfg.r, cfg.lora_alpha, cfg.use_rslora, converted)
    if cfg.rank_pattern or cfg.alpha_pattern:
        raise ValueError("rank/alpha patterns are not written by sdlora's training")
    plain = cfg.to_dict() | {"r": r, "lora_alpha": alpha, "use_rslora": False, "init_lora_weights": True}
    plain.pop("peft_version", None)  # the writer's version, which peft fills in itself
    return {k: v for k, v in plain.items() if k in CORE_CONFIG or not _is_default(k, v, type(cfg))}


def _is_default(key: str, value, cls) -> bool:
    f = cls.__dataclass_fields__.get(key)
    if f is None:
        return False
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return value == (sorted(default) if isinstance(default, set) else default)


def adapter_metadata(configs: dict[str, dict], packed: dict | None = None) -> str:
    """diffusers' `lora_adapter_metadata`: each `file_config` flattened with its component prefix, beside entries
    already flattened (`packed`, e.g. formats.diffusers_tensors')."""
    packed = dict(packed or {})
    for prefix, fields in configs.items():
        for k, v in fields.items():
            packed[f"{prefix}.{k}"] = sorted(v) if isinstance(v, set) else v
    return json.dumps(packed, indent=2, sort_keys=True, default=str)


def count_params(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state_dict.values())
