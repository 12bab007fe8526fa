"""Stable Diffusion 3 / 3.5 bases (StableDiffusion3Pipeline): how they are told apart and named, their components,
and which transformer layers LoRA adapts by default. Loading them is sdlora/sd3models.py's.

The transformer config stands where SD 1.x/XL's UNet config stands in `models.base_configs`, so the checks read an
SD3 base's size from it (sample_size x the VAE's factor; a side a multiple of the VAE's factor x patch_size)."""
from __future__ import annotations

from .errors import UserError

PIPELINE = "StableDiffusion3Pipeline"
# The base's text encoders in conditioning order with their transformers class: two CLIPs whose pooled projections
# and penultimate hidden states condition the MMDiT, and T5-XXL, whose last hidden states follow the CLIPs' tokens.
TEXT_CLASSES = {"text_encoder": "CLIPTextModelWithProjection", "text_encoder_2": "CLIPTextModelWithProjection",
                "text_encoder_3": "T5EncoderModel"}
TEXT_ENCODERS = tuple(TEXT_CLASSES)
TRAINABLE_TEXT = TEXT_ENCODERS[:2]  # --train_text_encoder: the CLIPs; T5 stays frozen, as in diffusers' SD3 script
# diffusers' SD3 LoRA script's default layers: the attention of both streams (image: to_*, text: add_*_proj/to_add_out)
TRANSFORMER_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                       "attn.to_out.0", "attn.to_q", "attn.to_v")
# How the log and card name each variant, and kohya's modelspec.architecture for it ("stable-diffusion-3-" + its
# model type: sd-scripts' sai_model_spec.py).
ARCHITECTURES = {"SD3": "stable-diffusion-3-medium", "SD3.5 Medium": "stable-diffusion-3-5-medium",
                 "SD3.5 Large": "stable-diffusion-3-5-large"}


def is_sd3(pipeline_class: str | None, config: dict | None = None) -> bool:
    """An SD3 pipeline class in model_index.json, or an MMDiT config (joint attention over text and image tokens)."""
    return (pipeline_class or "").startswith("StableDiffusion3") or "joint_attention_dim" in (config or {})


def variant(config: dict) -> str:
    """"SD3.5 Medium" (MMDiT-X: dual-attention blocks), "SD3.5 Large" (qk RMS norm, no dual attention) or "SD3"."""
    if config.get("dual_attention_layers"):
        return "SD3.5 Medium"
    return "SD3.5 Large" if config.get("qk_norm") else "SD3"


def architecture(config: dict) -> str:
    return ARCHITECTURES[variant(config)]


def lora_targets(lora_layers: str | None, lora_blocks: str | None, target_modules=None) -> list[str]:
    """The transformer layers LoRA adapts, as diffusers' SD3 script picks them: --lora_layers (default: both streams'
    attention) in every block, or in the --lora_blocks given. `target_modules`: an explicit --target_modules, used
    as it is when neither SD3 flag is given."""
    if target_modules and not lora_layers and not lora_blocks:
        return list(target_modules)
    layers = [s.strip() for s in lora_layers.split(",") if s.strip()] if lora_layers else list(TRANSFORMER_TARGETS)
    if not lora_blocks:
        return layers
    try:
        blocks = [int(b) for b in lora_blocks.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--lora_blocks {lora_blocks}: give comma-separated block numbers, e.g. 0,1,2") from None
    return [f"transformer_blocks.{b}.{layer}" for b in blocks for layer in layers]


def own_guidance(pipe) -> float | None:
    """The guidance an SD3 pipeline (or pipeline class) draws at when given none (StableDiffusion3Pipeline's own
    default, read from its signature); None for other pipelines, which keep sdlora's `models.GUIDANCE`."""
    cls = pipe if isinstance(pipe, type) else type(pipe)
    if not is_sd3(cls.__name__):
        return None
    import inspect

    return inspect.signature(cls.__call__).parameters["guidance_scale"].default
