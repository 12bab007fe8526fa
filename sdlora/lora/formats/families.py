"""The model family a LoRA was made for (SD 1.x, SD 2.x, SDXL), told from its layers or header, named as messages
and `inspect` name a base's family."""
from __future__ import annotations

import re

from .layers import Lora


def unet_family(unet_config, pipeline_class: str | None = None) -> str:
    """How messages and `inspect` name a base's family (models.family_of, models.FAMILIES): "SD 1.x", "SDXL", and
    "SD 1.x (cross-attention dim 32)" for widths no real checkpoint of the family has."""
    from ...models import family_of

    return family_name(family_of(unet_config, pipeline_class), unet_config.get("cross_attention_dim"))


def family(lora: Lora) -> str:
    """The family a LoRA was made for, named as `unet_family` names bases; "unknown" when nothing tells."""
    key, dim = lora_family(lora)
    return family_name(key, dim) if key else "unknown"


def family_name(key: str, dim: int | None) -> str:
    """A family's name; with the cross-attention width when it is not the width of the family's real checkpoints
    (CLIP ViT-L, OpenCLIP ViT-H, SDXL's two encoders side by side), e.g. tiny test models."""
    from ...models import FAMILIES, WIDTHS

    return FAMILIES[key] if dim in (None, WIDTHS.get(key)) else f"{FAMILIES[key]} (cross-attention dim {dim})"


def lora_family(lora: Lora) -> tuple[str | None, int | None]:
    """(models.family_of key or None, cross-attention width or None) of the base a LoRA was made for: from its
    UNet layers, else its text-encoder width, else kohya's ss_base_model_version header."""
    from ...models import FAMILY_BY_WIDTH, family_of

    if any(n.startswith("transformer.") for n in lora.modules):  # an MMDiT: SD3 / 3.5 (diffusers' SD3 layout)
        return "sd3", None
    config = _unet_config(lora)
    if config:
        return family_of(config), config["cross_attention_dim"]
    key = FAMILY_BY_WIDTH.get(_in_width(lora, r"text_encoder\..*(q_proj|k_proj|v_proj|fc1)"))
    return key or _metadata_family(lora.metadata), None


# Layers only SDXL has: a second text encoder, the UNet's added-conditioning MLP, transformer depth > 1, and
# original-UNet names.
_XL_LAYERS = (r"(text_encoder_2\.|unet\.(add_embedding\.|.*\.transformer_blocks\.[1-9]"
              r"|(input_blocks|output_blocks|middle_block)\.))")


def _unet_config(lora: Lora) -> dict:
    """What a LoRA's layers tell of the UNet config it was made for, as models.family_of reads one; {} if nothing."""
    from ...models import WIDTHS

    dim = _in_width(lora, r"unet\..*\.attn2\.to_[kv]")
    xl = (dim == WIDTHS["sdxl"] or _metadata_family(lora.metadata) == "sdxl"
          or any(re.match(_XL_LAYERS, n) for n in lora.modules))
    if dim is None and not xl:
        return {}
    linear = any(re.match(r"unet\..*\.proj_(in|out)$", n) and (m.kind != "lora" or m.down.dim() == 2)
                 for n, m in lora.modules.items())
    return {"cross_attention_dim": dim, "use_linear_projection": linear,
            "addition_embed_type": "text_time" if xl else None}


def _in_width(lora: Lora, pattern: str) -> int | None:
    """The input width of the first layer whose name matches `pattern`, or None."""
    return next((m.in_features for n, m in lora.modules.items() if re.match(pattern + "$", n)), None)


def _metadata_family(metadata: dict) -> str | None:
    """kohya's ss_base_model_version (sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0) as a family key."""
    version = str(metadata.get("ss_base_model_version") or "")
    return next((k for p, k in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")) if version.startswith(p)), None)
