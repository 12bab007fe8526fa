"""Build a tiny SD1.x-architecture pipeline locally (random weights, no download).

Same classes as Stable Diffusion 1.x — UNet2DConditionModel with cross-attention,
AutoencoderKL, CLIPTextModel, CLIPTokenizer — so every LoRA code path is the real one.
Used by tests, benchmarks and the README's offline demo.
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


# SD1.x's noise schedule (clip_sample=False for DDPM: x0 lives in latent space, not [-1, 1]).
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1)

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
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
            norm_num_groups=8, layers_per_block=1, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        ),
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
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    ),
}


def build_components(arch: str = "tiny", seed: int = 0):
    """Return (unet, vae, text_encoder) with random weights for a named architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = ARCHS[arch]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    vocab_size = len(_byte_vocab())
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1, **cfg["text"],
    ))
    return unet, vae, text_encoder


def make_tiny(out_dir: str | Path, arch: str = "tiny", seed: int = 0) -> Path:
    """Write a StableDiffusionPipeline folder that `from_pretrained(out_dir)` loads."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    out = Path(out_dir)
    unet, vae, text_encoder = build_components(arch, seed)
    tokenizer = write_tokenizer(out / "tokenizer")
    scheduler = DDPMScheduler(**SCHEDULE, clip_sample=False)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out))
    return out
