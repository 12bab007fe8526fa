"""Build tiny (or full-size) Stable Diffusion pipelines locally (random weights, no download).

Same classes as the real models — UNet2DConditionModel with cross-attention, AutoencoderKL,
CLIPTextModel (+ CLIPTextModelWithProjection for SDXL), CLIPTokenizer — so every LoRA code path is
the real one. Used by tests, benchmarks and the README's offline demo.

Architectures (`ARCHS`): "tiny" (SD1.x layout, the bundled default), "sd15" (SD 1.5's published
configs), "sd2-tiny" (SD 2.x layout: linear projections, per-block heads, gelu text encoder,
v-prediction), "sdxl-tiny" (SDXL layout: two text encoders, text_time conditioning) and "sdxl"
(SDXL base 1.0's published configs: 3.37 G parameters, 13.5 GB in fp32 — benchmarks only); SD3 / 3.5 ones
("sd3", "sd35-medium", "sd35-large") are sdlora/tiny_sd3.py's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def byte_chars() -> list[str]:
    """CLIP's byte-to-unicode alphabet (the 256 characters byte-level BPE starts from), from transformers."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


# Byte-level vocabulary with no merges: every word tokenizes to characters, which is all a
# tiny model needs; built here so nothing is downloaded.
def _byte_vocab() -> dict[str, int]:
    chars = byte_chars()
    vocab = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def write_tokenizer(path: Path, max_length: int = 77):
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(_byte_vocab()))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(str(path))
    return tok


# SD1.x's noise schedule (clip_sample=False for DDPM: x0 lives in latent space, not [-1, 1]); SD 2.x and
# SDXL use the same betas.
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1)
# SDXL base 1.0's scheduler (EulerDiscreteScheduler in its model_index.json).
SDXL_SCHEDULE = dict(SCHEDULE, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)

# SDXL's second text encoder: OpenCLIP ViT-bigG/14 (gelu, pooled output projected to 1280).
_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
             max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
_VIT_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)

_TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                 norm_num_groups=8, layers_per_block=1, sample_size=32,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)

ARCHS = {
    # name: (unet kwargs, vae kwargs, text encoder kwargs)
    "tiny": dict(
        unet=dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        vae=_TINY_VAE,
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=77),
    ),
    # Stable Diffusion 1.5's published configs (runwayml/stable-diffusion-v1-5), random weights.
    "sd15": dict(
        unet=dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        text=_VIT_L,
    ),
    # SD 2.x's layout at tiny size: linear proj_in/proj_out, heads per block (a tuple, as SD2's
    # [5, 10, 20, 20]), a gelu text encoder (OpenCLIP-H's activation) and a v-prediction scheduler
    # (stable-diffusion-2's 768-v schedule).
    "sd2-tiny": dict(
        unet=dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=(2, 4), use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        vae=_TINY_VAE,
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=77, hidden_act="gelu", projection_dim=32),
        scheduler=dict(prediction_type="v_prediction"),
    ),
    # SDXL's layout at tiny size, with diffusers' own dummy SDXL numbers (tests/pipelines/
    # stable_diffusion_xl: two blocks, the first without attention, transformer_layers_per_block
    # (1, 2), heads (2, 4), addition_time_embed_dim 8): cross_attention_dim = 32 + 32 (both text
    # encoders' hidden states, concatenated), projection_class_embeddings_input_dim = 6 time ids x 8
    # + 32 (text_encoder_2's pooled projection). 64 px by default (sample_size 16 x the VAE's 4).
    "sdxl-tiny": dict(
        unet=dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=64,
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
            norm_num_groups=8, layers_per_block=1, sample_size=64, scaling_factor=0.13025, force_upcast=True,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        ),
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32),
        text_2=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                    max_position_embeddings=77, hidden_act="gelu", projection_dim=32),
    ),
    # SDXL base 1.0's published configs (stabilityai/stable-diffusion-xl-base-1.0), random weights.
    "sdxl": dict(
        unet=dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
            addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + 1280 (pooled text)
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        text=_VIT_L,
        text_2=_BIGG,
    ),
}


def is_xl(arch: str) -> bool:
    """Whether a named architecture is SDXL's (two text encoders, a StableDiffusionXLPipeline)."""
    return "text_2" in ARCHS[arch]


def text_config(**kw):
    from transformers import CLIPTextConfig

    # The byte-level vocabulary built here, not CLIP's 49408 tokens: the embedding table is the only
    # part smaller than the real model's.
    vocab_size = len(_byte_vocab())
    return CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                          pad_token_id=vocab_size - 1, **kw)


def build(arch: str = "tiny", seed: int = 0) -> dict:
    """{"unet", "vae", "text_encoder"[, "text_encoder_2"]} with random weights for a named architecture
    (under `with torch.device("meta"):` nothing is allocated)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = ARCHS[arch]
    torch.manual_seed(seed)
    parts = {"unet": UNet2DConditionModel(**cfg["unet"]), "vae": AutoencoderKL(**cfg["vae"]),
             "text_encoder": CLIPTextModel(text_config(**cfg["text"]))}
    if "text_2" in cfg:
        parts["text_encoder_2"] = CLIPTextModelWithProjection(text_config(**cfg["text_2"]))
    return parts


def build_components(arch: str = "tiny", seed: int = 0):
    """Return (unet, vae, text_encoder) with random weights for a named SD1.x/2.x architecture."""
    if is_xl(arch):
        raise ValueError(f"{arch} has two text encoders; use build({arch!r})")
    parts = build(arch, seed)
    return parts["unet"], parts["vae"], parts["text_encoder"]


def make_tiny(out_dir: str | Path, arch: str = "tiny", seed: int = 0) -> Path:
    """Write a pipeline folder that `from_pretrained(out_dir)` loads: a StableDiffusionPipeline, or a
    StableDiffusionXLPipeline for the SDXL architectures (SD3's: tiny_sd3.make_sd3)."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    out = Path(out_dir)
    parts = build(arch, seed)
    tokenizer = write_tokenizer(out / "tokenizer")
    if is_xl(arch):
        pipe = StableDiffusionXLPipeline(
            **parts, tokenizer=tokenizer, tokenizer_2=write_tokenizer(out / "tokenizer_2"),
            scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULE), force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        scheduler = DDPMScheduler(**SCHEDULE, clip_sample=False, **ARCHS[arch].get("scheduler", {}))
        pipe = StableDiffusionPipeline(
            **parts, tokenizer=tokenizer, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(str(out))
    return out
