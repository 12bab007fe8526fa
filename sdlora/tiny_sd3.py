"""Build Stable Diffusion 3 / 3.5 pipelines locally (random weights, no download), as sdlora/tiny.py does for SD 1.x/XL.

Same classes as the real models — SD3Transformer2DModel (MMDiT), a 16-channel AutoencoderKL, two
CLIPTextModelWithProjection, a T5EncoderModel, FlowMatchEulerDiscreteScheduler — so every SD3 code path is the
real one. The tokenizers are built here: CLIP's byte-level vocabulary with no merges (tiny.write_tokenizer) and a
T5 (Unigram) tokenizer over the same byte characters.

Architectures (`SD3_ARCHS`): "sd3" (SD3.5 Medium's layout at tiny size: qk RMS norm, one dual-attention
(MMDiT-X) block, 64 px), "sd35-medium" and "sd35-large" (the published transformer configs of
stabilityai/stable-diffusion-3.5-medium / -large with their real text encoders and VAE: benchmarks only).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .tiny import byte_chars, text_config, write_tokenizer

# SD3's VAE: 16 latent channels, no quant convs, latents shifted then scaled (stabilityai/stable-diffusion-3.5-*).
_SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.0609, scaling_factor=1.5305, force_upcast=True)
# SD3's schedule (model_index: FlowMatchEulerDiscreteScheduler, shift 3.0).
SD3_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
               max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
_T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
               relative_attention_num_buckets=32, relative_attention_max_distance=128)
_REAL_VAE = dict(_SD3_VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
_MMDIT = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
              joint_attention_dim=4096, pooled_projection_dim=2048)

SD3_ARCHS = {
    # Tiny: both CLIPs 32 wide (pooled 32 + 32 = 64, hidden states 64 side by side), T5 64 wide = the joint
    # attention width; VAE factor 4 and patch 2, so 64 px is a 16 x 16 latent of 8 x 8 patches.
    "sd3": dict(
        transformer=dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                         attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                         caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32,
                         qk_norm="rms_norm", dual_attention_layers=(0,)),
        vae=dict(_SD3_VAE, block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=1, sample_size=64,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32),
        text_2=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                    max_position_embeddings=77, hidden_act="gelu", projection_dim=32),
        t5=dict(d_model=64, d_ff=64, d_kv=16, num_heads=4, num_layers=1, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=8, relative_attention_max_distance=16),
    ),
    "sd35-medium": dict(
        transformer=dict(_MMDIT, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
        vae=_REAL_VAE, text=_CLIP_L, text_2=_CLIP_G, t5=_T5_XXL),
    "sd35-large": dict(
        transformer=dict(_MMDIT, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                         pos_embed_max_size=192, qk_norm="rms_norm"),
        vae=_REAL_VAE, text=_CLIP_L, text_2=_CLIP_G, t5=_T5_XXL),
}


def t5_vocab() -> list[tuple[str, float]]:
    """A Unigram vocabulary of T5's three special pieces and the byte characters, each piece also with SentencePiece's
    word-start mark: every word tokenizes to characters, which is all a tiny model needs."""
    chars = byte_chars()
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars] + \
        [("\u2581" + c, -1.0) for c in chars] + [("\u2581", -2.0)]


def write_t5_tokenizer(path: Path, max_length: int = 256):
    from transformers import T5Tokenizer

    tok = T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=max_length)
    tok.save_pretrained(str(path))
    return tok


def build(arch: str = "sd3", seed: int = 0) -> dict:
    """{"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"} with random weights."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    cfg = SD3_ARCHS[arch]
    torch.manual_seed(seed)
    return {"transformer": SD3Transformer2DModel(**cfg["transformer"]), "vae": AutoencoderKL(**cfg["vae"]),
            "text_encoder": CLIPTextModelWithProjection(text_config(**cfg["text"])),
            "text_encoder_2": CLIPTextModelWithProjection(text_config(**cfg["text_2"])),
            "text_encoder_3": T5EncoderModel(T5Config(vocab_size=len(t5_vocab()), pad_token_id=0, eos_token_id=1,
                                                      decoder_start_token_id=0, **cfg["t5"]))}


def make_sd3(out_dir: str | Path, arch: str = "sd3", seed: int = 0) -> Path:
    """Write a StableDiffusion3Pipeline folder that `from_pretrained(out_dir)` loads."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    out = Path(out_dir)
    pipe = StableDiffusion3Pipeline(
        **build(arch, seed), scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE),
        tokenizer=write_tokenizer(out / "tokenizer"), tokenizer_2=write_tokenizer(out / "tokenizer_2"),
        tokenizer_3=write_t5_tokenizer(out / "tokenizer_3"))
    pipe.save_pretrained(str(out))
    return out
