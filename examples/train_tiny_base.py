"""Train the tiny Stable Diffusion models shipped in `sdlora/assets/tiny-sd` (and `tiny-sdxl`, `tiny-sd3`) from scratch.

    python examples/train_tiny_base.py                      # rebuilds sdlora/assets/tiny-sd
    python examples/train_tiny_base.py --out /tmp/tiny-sd --vae-steps 50 --unet-steps 50  # smoke
    python examples/train_tiny_base.py --arch sdxl --threads 2  # rebuilds sdlora/assets/tiny-sdxl
    python examples/train_tiny_base.py --arch sd3 --threads 2   # rebuilds sdlora/assets/tiny-sd3

Everything is generated and seeded here — images (examples/shapes.py), the tokenizer's vocabulary,
the VAE, the text encoder and the UNet — so anyone can rebuild the weights on a CPU, offline.
Stages:

1. tokenizer: a CLIPTokenizer whose vocabulary is the byte-level alphabet (so any text
   tokenizes) plus one token per caption word (built with BPE merges);
2. VAE (AutoencoderKL, 32 px -> 4x8x8 latents) trained as a general image codec on the
   caption set's images plus generic clutter images; its scaling_factor is measured (1 / std);
3. latents of the captioned training images are encoded once and cached;
4. UNet2DConditionModel (cross-attention) + CLIPTextModel trained jointly: epsilon prediction,
   SD1.x's scaled_linear noise schedule, min-SNR-5 weighting, caption dropout (for classifier-
   free guidance), AdamW with warm-up and linear decay, EMA weights saved;
5. the VAE decoder (encoder frozen) fine-tuned on the looks LoRAs will draw, so 2 px outlines and
   small eyes survive decoding;
6. saved with `StableDiffusionPipeline.save_pretrained` (safetensors, fp32) with a DDIM
   scheduler on SD's schedule and clip_sample=False.

(shape colour, background colour) pairs in shapes.HELD_OUT_PAIRS are never shown; the
evaluation (examples/eval_prompt_following.py) measures them.

--arch sdxl builds the SDXL-architecture stand-in (a StableDiffusionXLPipeline) instead: the shipped
tiny-sd's tokenizer (as tokenizer and tokenizer_2) and VAE are reused as they are (stages 1, 2 and 5
skipped, latents scaled by its scaling_factor), and stage 4 trains from scratch a UNet with SDXL's
layout (no attention in the first block, linear projections, text_time added conditioning) jointly
with two text encoders (CLIPTextModel, CLIPTextModelWithProjection), conditioned as SDXL is
(sdlora.training.conditioning: both encoders' penultimate hidden states side by side, the second's
pooled projection, time ids (32, 32, 0, 0, 32, 32)). Half the dropped captions are zeroed, as the
pipeline's force_zeros_for_empty_prompt does for the unconditional half of guidance; the other half
are the encoded empty prompt (what a negative prompt of "" gives).

--arch sd3 builds the SD3-architecture one (a StableDiffusion3Pipeline, sdlora/assets/tiny-sd3) on the
same reused tokenizer (as tokenizer and tokenizer_2) and VAE (its config given shift_factor 0.0, which
the SD3 pipeline reads; the transformer's latent channels are read from the VAE's config). Stage 4
trains from scratch an SD3Transformer2DModel (MMDiT, 2x2 patches: 8x8 latents are 16 image tokens)
jointly with two CLIPTextModelWithProjection encoders and a tiny T5EncoderModel (tokenizer: a T5
tokenizer over byte characters, sdlora.tiny_sd3) with SD3's rectified-flow objective as sdlora's SD3
training computes it (sdlora.training.flow: logit-normal timesteps on a FlowMatchEulerDiscreteScheduler
schedule, shift 1.0 for 8x8 latents; the flow noise - latent regressed), prompts encoded as
StableDiffusion3Pipeline encodes them (sdlora.training.sd3cond). Each step's T5 sequence length is one
of --t5-lengths (77: sdlora's --max_sequence_length default, 256: the pipeline's), so the model draws
the same through either. Dropped captions are the encoded empty prompt (the pipeline's negative "").
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import shapes  # the example data's generator and detectors (beside this script)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "sdlora" / "assets" / "tiny-sd"
DEFAULT_OUT_XL = ROOT / "sdlora" / "assets" / "tiny-sdxl"
DEFAULT_OUT_SD3 = ROOT / "sdlora" / "assets" / "tiny-sd3"
MAX_LENGTH = 16          # tokenizer model_max_length (captions use <= 11 tokens)
CROSS_DIM = 64           # text encoder hidden size = UNet cross_attention_dim
XL_TIME_DIM = 8          # SDXL: addition_time_embed_dim (per time id)
XL_TIME_IDS = (shapes.RES, shapes.RES, 0, 0, shapes.RES, shapes.RES)  # original h, w; crop top, left; target h, w
XL_ZERO_P = 0.5          # SDXL: share of dropped (empty) captions whose conditioning is zeroed
SD3_WIDTH = 128          # SD3: the MMDiT's width (heads x head dim) = T5's width = joint_attention_dim
SD3_SHIFT = 1.0          # SD3: FlowMatch schedule shift (SD3 uses 3.0 at 1024 px; 8x8 latents need none)


# ------------------------------------------------------------------------------- tokenizer
def build_tokenizer(path: Path, words=shapes.VOCAB_WORDS, max_length: int = MAX_LENGTH):
    """CLIPTokenizer: byte alphabet + one token per word in `words` (left-to-right merges)."""
    from transformers import CLIPTokenizer

    from sdlora.tiny import byte_chars

    chars = byte_chars()
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab[tok] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words), key=lambda w: (-len(w), w)):  # longest first: no clashes
        if len(word) < 2:
            continue
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            pair = (left, right)
            left = left + right
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(left, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length)
    for word in words:  # every caption word must be a single token
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))
    return tok


# ---------------------------------------------------------------------------------- models
def build_models(vocab_size: int, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
        layers_per_block=1, norm_num_groups=8, sample_size=shapes.RES,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )
    unet = UNet2DConditionModel(
        sample_size=shapes.RES // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=CROSS_DIM,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    text_encoder = CLIPTextModel(text_config(vocab_size))
    return vae, unet, text_encoder


def text_config(vocab_size: int, **kw):
    """The tiny CLIP text encoder's config (`kw`: SDXL's second encoder's activation and projection)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CROSS_DIM, intermediate_size=2 * CROSS_DIM,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=MAX_LENGTH,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **kw,
    )


def build_xl_models(vocab_size: int, seed: int):
    """SDXL's layout at tiny-sd's size: (unet, text_encoder, text_encoder_2).

    The UNet has tiny-sd's channels, depth and 8x8 latents but SDXL's block pattern (the first block
    without attention; heads of 16 channels; two transformer layers in the last block and the mid
    block), linear proj_in/proj_out and text_time added conditioning: 6 time ids x XL_TIME_DIM + the
    second encoder's pooled projection. Cross-attention reads both encoders' hidden states side by side
    (2 x CROSS_DIM). text_encoder (quick_gelu, as CLIP ViT-L) and text_encoder_2 (gelu with a projection,
    as OpenCLIP bigG) are tiny-sd's encoder size; SDXL conditions on text_encoder's penultimate layer, so
    its last layer stays at its random init."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=shapes.RES // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=2 * CROSS_DIM,
        attention_head_dim=(2, 4, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=XL_TIME_DIM,
        projection_class_embeddings_input_dim=len(XL_TIME_IDS) * XL_TIME_DIM + CROSS_DIM,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    text_encoder = CLIPTextModel(text_config(vocab_size))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(vocab_size, hidden_act="gelu", projection_dim=CROSS_DIM))
    return unet, text_encoder, text_encoder_2


def build_sd3_models(vocab_size: int, t5_vocab_size: int, latent_channels: int, seed: int, layers: int = 4):
    """SD3's layout at tiny size: (transformer, text_encoder, text_encoder_2, text_encoder_3).

    An SD3Transformer2DModel (MMDiT: joint attention over image and text tokens, qk RMS norm) on the VAE's
    latents (its channels read from its config) in 2x2 patches: 8x8 latents are 16 image tokens. Two
    CLIPTextModelWithProjection (the classes StableDiffusion3Pipeline takes; quick_gelu as CLIP ViT-L, gelu as
    OpenCLIP bigG) at tiny-sd's encoder size, whose penultimate hidden states side by side (2 x CROSS_DIM) are
    zero-padded to T5's width, and whose pooled projections side by side are the pooled text; a T5EncoderModel
    SD3_WIDTH wide whose tokens follow the CLIPs'."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    latent = shapes.RES // 4
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=layers, attention_head_dim=32, num_attention_heads=SD3_WIDTH // 32,
        joint_attention_dim=SD3_WIDTH, caption_projection_dim=SD3_WIDTH, pooled_projection_dim=2 * CROSS_DIM,
        pos_embed_max_size=4 * latent // 2, qk_norm="rms_norm",
    )
    text_encoder = CLIPTextModelWithProjection(text_config(vocab_size, projection_dim=CROSS_DIM))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(vocab_size, hidden_act="gelu", projection_dim=CROSS_DIM))
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab_size, d_model=SD3_WIDTH, d_ff=2 * SD3_WIDTH, d_kv=32, num_heads=SD3_WIDTH // 32,
        num_layers=2, feed_forward_proj="gated-gelu", relative_attention_num_buckets=16,
        relative_attention_max_distance=64, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return transformer, text_encoder, text_encoder_2, text_encoder_3


def to_tensor(images) -> torch.Tensor:
    a = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def log(msg: str, t0: float):
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def set_vae_lr(opt, base: float, step: int, total: int):
    """Both VAE stages' schedule: 50-step linear warm-up, then square-root decay to 0."""
    for group in opt.param_groups:
        group["lr"] = base * min(1.0, (step + 1) / 50) * (1 - step / total) ** 0.5


@torch.no_grad()
def round_trip(vae, x: torch.Tensor) -> torch.Tensor:
    """Encode -> decode (posterior mean), clamped to [-1, 1]."""
    return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)


def to_images(y: torch.Tensor) -> list:
    """[-1, 1] NCHW -> uint8 HWC arrays for the detectors (the inverse of to_tensor)."""
    return list(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


# --------------------------------------------------------------------------------- stage 2
def train_vae(vae, args, t0):
    rng = random.Random(args.seed + 1)
    n = args.vae_images
    nb = int(n * args.vae_base_frac)
    imgs = [shapes.render(shapes.random_spec(rng)) for _ in range(nb)]
    imgs += [shapes.random_clutter(rng) for _ in range(n - nb)]
    data = to_tensor(imgs)
    g = torch.Generator().manual_seed(args.seed + 2)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(args.vae_steps):
        set_vae_lr(opt, args.vae_lr, step, args.vae_steps)
        x = data[torch.randint(0, n, (args.vae_batch,), generator=g)]
        flip = torch.rand(args.vae_batch, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = 0.5 * (post.mean ** 2 + post.var - 1.0 - post.logvar).mean()
        loss = mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} mse {mse.item():.4f} kl {kl.item():.2f}", t0)
    vae.eval()
    check_vae(vae, t0)
    return vae


@torch.no_grad()
def check_vae(vae, t0):
    """Log how well the VAE round-trips each look (base shapes, creature, DreamBooth subject)."""
    rng = random.Random(12345)
    specs = [shapes.random_spec(rng, pairs=shapes.all_pairs()) for _ in range(96)]
    for look in ("plain", "creature", "subject"):
        x = to_tensor([shapes.render(s, look) for s in specs])
        y = round_trip(vae, x)
        ims = to_images(y)
        follow = shapes.prompt_following(ims, specs)
        log(f"vae round trip {look:8s}: mse {F.mse_loss(y, x).item():.4f}  bg {follow['bg']:.0%} "
            f"colour {follow['colour']:.0%}  styled {np.mean([shapes.is_styled(i) for i in ims]):.0%}  "
            f"subject {np.mean([shapes.is_subject(i) for i in ims]):.0%}", t0)


# --------------------------------------------------------------------------------- stage 3/4
def caption_variants(spec) -> list[str]:
    s, c, b = spec["shape"], spec["colour"], spec["bg"]
    return [shapes.caption(s, c, b), shapes.caption(s, c, None), shapes.caption(s, None, b),
            shapes.caption(s, None, None), ""]


CAPTION_P = torch.tensor([0.70, 0.08, 0.08, 0.04, 0.10])  # full, no bg, no colour, shape, empty


def train_unet(vae, unet, encoders, tokenizer, args, t0):
    """Stage 4: the UNet and its text encoder(s) — [text_encoder] (SD1) or [text_encoder, text_encoder_2]
    (SDXL, whose VAE is reused: its scaling_factor is kept) — trained jointly on cached latents."""
    from diffusers import DDPMScheduler

    xl = len(encoders) == 2
    rng = random.Random(args.seed + 3)
    specs = [shapes.random_spec(rng) for _ in range(args.images)]
    with torch.no_grad():
        lat = []
        for i in range(0, len(specs), 500):
            x = to_tensor([shapes.render(s) for s in specs[i:i + 500]])
            lat.append(vae.encode(x).latent_dist.mean)
        lat = torch.cat(lat)
    scale = float(1.0 / lat.std())
    if xl:
        log(f"measured scaling_factor {scale:.4f}; the reused VAE's {vae.config.scaling_factor:.4f} is kept", t0)
        scale = vae.config.scaling_factor
    else:
        vae.register_to_config(scaling_factor=scale)
    lat = lat * scale
    log(f"cached {len(lat)} latents {tuple(lat.shape[1:])}, scaling_factor {scale:.4f}", t0)

    texts = [v for s in specs for v in caption_variants(s)]
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.view(len(specs), 5, -1)
    g = torch.Generator().manual_seed(args.seed + 4)
    if xl:
        from sdlora.training import conditioning

        time_ids = torch.tensor([XL_TIME_IDS], dtype=torch.float32)

        def condition(idx, var):
            """SDXL's conditioning of the captions texts[idx, var]; some empty ones zeroed."""
            text = conditioning.encode(encoders, [tokenizer, tokenizer],
                                       [texts[5 * i + v] for i, v in zip(idx.tolist(), var.tolist())])
            keep = 1.0 - ((var == 4) & (torch.rand(len(var), generator=g) < XL_ZERO_P)).float()
            text = conditioning.Text(text.embeds * keep[:, None, None], text.pooled * keep[:, None])
            return text.embeds, conditioning.unet_kwargs(text, time_ids.expand(len(var), -1), lat.device, lat.dtype)
    else:
        def condition(idx, var):
            return encoders[0](ids[idx, var])[0], {}

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False)
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr            # min-SNR-5 for epsilon prediction

    n = len(lat)

    def step_loss(step):
        idx = torch.randint(0, n, (args.batch,), generator=g)
        var = torch.multinomial(CAPTION_P, args.batch, replacement=True, generator=g)
        x0 = lat[idx]
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = sched.add_noise(x0, noise, t)
        emb, added = condition(idx, var)
        pred = unet(xt, t, encoder_hidden_states=emb, **added).sample
        return ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mul(weight[t]).mean(), ""

    def after_step(step, params, ema):
        if args.eval_every and (step + 1) % args.eval_every == 0:
            quick_eval(unet, vae, encoders, tokenizer, params, ema, step + 1, t0)

    train_jointly((unet, *encoders), step_loss, args, t0, "unet", log_every=200, after_step=after_step)


def train_jointly(models, step_loss, args, t0, name: str, log_every: int, after_step=None):
    """Stage 4's loop for every architecture: all of `models`' weights trained together with AdamW (warm-up, then
    linear decay to a floor), gradient clipping and an EMA of every weight, which replaces them at the end.
    `step_loss(step) -> (loss, log note)` draws the step's batch and computes its loss."""
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    for m in models:
        m.train()
    warm = min(200, args.unet_steps // 10 + 1)
    running = 0.0
    for step in range(args.unet_steps):
        lr = args.lr * min(1.0, (step + 1) / warm) * min(1.0, 1.2 * (1 - step / args.unet_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss, note = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % log_every == 0 or step == args.unet_steps - 1:
            log(f"{name} step {step} loss {running:.4f} lr {lr:.2e}{note}", t0)
        if after_step:
            after_step(step, params, ema)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    for m in models:
        m.eval()


def cached_latents(vae, args, t0, shift: float = 0.0):
    """(specs, latents) of the captioned training images, shifted and scaled as the base's VAE config says."""
    rng = random.Random(args.seed + 3)
    specs = [shapes.random_spec(rng) for _ in range(args.images)]
    with torch.no_grad():
        lat = torch.cat([vae.encode(to_tensor([shapes.render(s) for s in specs[i:i + 500]])).latent_dist.mean
                         for i in range(0, len(specs), 500)])
    lat = (lat - shift) * vae.config.scaling_factor
    log(f"cached {len(lat)} latents {tuple(lat.shape[1:])}, shift {shift}, scaling_factor "
        f"{vae.config.scaling_factor:.4f} (std after: {lat.std():.3f})", t0)
    return specs, lat


def train_flow(vae, transformer, encoders, tokenizers, args, t0):
    """Stage 4 for --arch sd3: the MMDiT and its three text encoders trained jointly with SD3's rectified-flow
    objective as sdlora's SD3 training computes it (sdlora.training.flow: logit-normal timesteps on the FlowMatch
    schedule, x_s = (1 - s) x0 + s n, the flow n - x0 regressed directly) on prompts encoded as
    StableDiffusion3Pipeline encodes them (sdlora.training.sd3cond). Each step's T5 sequence length is drawn from
    --t5-lengths, so the model draws the same at the pipeline's default of 256 T5 tokens and at the 77 that
    sdlora's training uses. Dropped captions are the encoded empty prompt (the pipeline's negative "")."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    from sdlora.training import flow, sd3cond

    specs, lat = cached_latents(vae, args, t0, shift=vae.config.shift_factor or 0.0)
    texts = [v for s in specs for v in caption_variants(s)]
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SHIFT)
    objective = SimpleNamespace(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                precondition_outputs=0)
    lengths = [int(x) for x in args.t5_lengths.split(",")]
    joint = transformer.config.joint_attention_dim
    g = torch.Generator().manual_seed(args.seed + 4)
    n = len(lat)

    def step_loss(step):
        idx = torch.randint(0, n, (args.batch,), generator=g)
        var = torch.multinomial(CAPTION_P, args.batch, replacement=True, generator=g)
        length = lengths[int(torch.randint(0, len(lengths), (1,), generator=g))]
        x0 = lat[idx]
        noise = torch.randn(x0.shape, generator=g)
        noised = flow.noise(sched, x0, noise, objective, g)
        text = sd3cond.encode(encoders, tokenizers, [texts[5 * i + v] for i, v in zip(idx.tolist(), var.tolist())],
                              length, joint)
        pred = transformer(noised.noisy, timestep=noised.timesteps, return_dict=False,
                           **sd3cond.transformer_kwargs(text, x0.device, x0.dtype))[0]
        return flow.per_sample_loss(pred, x0, noise, noised, objective).mean(), f" t5 tokens {length}"

    train_jointly((transformer, *encoders), step_loss, args, t0, "transformer", log_every=100)
    return sched


@torch.no_grad()
def quick_eval(unet, vae, encoders, tokenizer, params, ema, step, t0):
    """Held-out prompt following of the EMA weights (24 prompts, DPM-Solver 20 steps)."""
    import eval_prompt_following as ev
    from sdlora.pipeline import assemble

    backup = [p.detach().clone() for p in params]
    for e, p in zip(ema, params):
        p.copy_(e)
    for m in (unet, *encoders):
        m.eval()
    xl = dict(text_encoder_2=encoders[1], tokenizer_2=tokenizer) if len(encoders) == 2 else {}
    pipe = assemble(unet, vae, encoders[0], tokenizer, dict(beta_start=0.00085, beta_end=0.012,
                                                            beta_schedule="scaled_linear", num_train_timesteps=1000),
                    **xl)
    for split in ("heldout", "train"):
        res, _, _ = ev.evaluate(pipe, split, per_prompt=1)
        log(f"eval step {step} {split}: bg {res['bg']:.0%} colour {res['colour']:.0%} "
            f"shape {res['shape']:.0%} all {res['all']:.0%}", t0)
    for b, p in zip(backup, params):
        p.copy_(b)
    for m in (unet, *encoders):
        m.train()


# --------------------------------------------------------------------------------- stage 5
def finetune_decoder(vae, args, t0):
    """Sharpen the VAE's decoder on the looks a LoRA will be asked to draw.

    The 8x8x4 latent bottleneck blurs 2 px outlines and 4 px eyes away when the decoder is trained as
    a general codec (round trip of the creature look: 0 % styled), and a UNet LoRA can only produce
    what the decoder can draw. The encoder stays frozen, so the UNet's latents and scaling_factor
    are unchanged; SD's own VAE, likewise, was trained on web images that include such drawings.
    The generating parts (UNet, text encoder) never see these looks: base samples stay unstyled.
    """
    rng = random.Random(args.seed + 5)
    n = args.decoder_images
    looks = ["plain", "creature", "subject"]
    weights = [1 - args.decoder_creature_frac - args.decoder_subject_frac - args.decoder_clutter_frac,
               args.decoder_creature_frac, args.decoder_subject_frac]
    imgs = []
    for _ in range(n):
        if rng.random() < args.decoder_clutter_frac:
            imgs.append(shapes.random_clutter(rng))
        else:
            look = rng.choices(looks, weights)[0]
            imgs.append(shapes.render(shapes.random_spec(rng, pairs=shapes.all_pairs()), look))
    x = to_tensor(imgs)
    with torch.no_grad():  # frozen encoder: its posterior is computed once
        post = [vae.encode(x[i:i + 500]).latent_dist for i in range(0, n, 500)]
        mean, std = torch.cat([q.mean for q in post]), torch.cat([q.std for q in post])
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 6)
    vae.train()
    for step in range(args.decoder_steps):
        set_vae_lr(opt, args.decoder_lr, step, args.decoder_steps)
        idx = torch.randint(0, n, (args.vae_batch,), generator=g)
        m = mean[idx]
        z = m + std[idx] * torch.randn(m.shape, generator=g)
        mse = F.mse_loss(vae.decode(z).sample, x[idx])
        opt.zero_grad(set_to_none=True)
        mse.backward()
        opt.step()
        if step % 200 == 0 or step == args.decoder_steps - 1:
            log(f"decoder step {step} mse {mse.item():.4f}", t0)
    vae.eval()
    check_vae(vae, t0)
    return vae


def save_pipeline(out: Path, unet, vae, text_encoder, tokenizer, info: dict, text_encoder_2=None, reused: Path = None):
    """A StableDiffusionPipeline, or given `text_encoder_2` a StableDiffusionXLPipeline (the one tokenizer
    as both of its tokenizers), with a DDIM scheduler on SD's schedule. `reused`: the pipeline folder whose
    tokenizer and VAE were used unchanged; their files are copied as they are (saving the loaded objects
    would add loader state to their configs, such as the VAE's local _name_or_path)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    if text_encoder_2 is not None:
        pipe = StableDiffusionXLPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    if reused is not None:
        for name, src in (("tokenizer", "tokenizer"), ("tokenizer_2", "tokenizer"), ("vae", "vae")):
            if (tmp / name).is_dir():
                shutil.rmtree(tmp / name)
                shutil.copytree(reused / src, tmp / name)
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return pipe


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=["sd1", "sdxl", "sd3"], default="sd1",
                   help="sd1: tiny-sd (all stages); sdxl / sd3: the SDXL- / SD3-architecture tiny-sdxl / tiny-sd3 on "
                        "--reuse-from's tokenizer and VAE (the --vae-* and --decoder-* options do not apply)")
    p.add_argument("--out", type=Path, default=None,
                   help="default: sdlora/assets/tiny-sd (sd1), tiny-sdxl (sdxl) or tiny-sd3 (sd3)")
    p.add_argument("--reuse-from", type=Path, default=DEFAULT_OUT,
                   help="sdxl, sd3: the trained tiny-sd folder whose tokenizer and VAE are reused (default: the "
                        "bundled one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all cores; 1 shares the machine but is ~1.4x slower)")
    p.add_argument("--batch", type=int, default=None, help="UNet / transformer batch; default: 64 (sd1, sdxl), 32 (sd3)")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-steps", type=int, default=1600)
    p.add_argument("--vae-base-frac", type=float, default=0.5,
                   help="share of caption-set images among the VAE's (the rest: generic clutter)")
    p.add_argument("--vae-images", type=int, default=8000)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--unet-steps", type=int, default=None,
                   help="UNet (sd3: transformer) steps; default: 1800 (sd1), 4000 (sdxl), 2500 (sd3)")
    p.add_argument("--sd3-layers", type=int, default=4, help="sd3: joint transformer blocks")
    p.add_argument("--t5-lengths", default="77,256",
                   help="sd3: T5 sequence lengths, one drawn per step (77: sdlora's --max_sequence_length default; "
                        "256: StableDiffusion3Pipeline's)")
    p.add_argument("--images", type=int, default=12000, help="captioned training images")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--decoder-steps", type=int, default=1600, help="VAE decoder fine-tune steps (0: skip)")
    p.add_argument("--decoder-images", type=int, default=4000)
    p.add_argument("--decoder-lr", type=float, default=1.5e-3)
    p.add_argument("--decoder-creature-frac", type=float, default=0.5)
    p.add_argument("--decoder-subject-frac", type=float, default=0.0)
    p.add_argument("--decoder-clutter-frac", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=0, help="log held-out prompt following")
    p.add_argument("--decoder-only", type=Path, default=None,
                   help="run only the decoder stage on a model saved by stages 1-4 (writes --out)")
    p.add_argument("--vae-from", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save-vae", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.out is None:
        args.out = {"sdxl": DEFAULT_OUT_XL, "sd3": DEFAULT_OUT_SD3}.get(args.arch, DEFAULT_OUT)
    if args.unet_steps is None:
        args.unet_steps = {"sdxl": 4000, "sd3": 2500}.get(args.arch, 1800)
    if args.batch is None:
        args.batch = 32 if args.arch == "sd3" else 64
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.arch in ("sdxl", "sd3"):
        if args.decoder_only:
            p.error(f"--decoder-only is for --arch sd1 ({args.arch} reuses tiny-sd's VAE)")
        return (main_xl if args.arch == "sdxl" else main_sd3)(args, argv, t0)
    if args.decoder_only:
        return decoder_only(args, t0)
    with tempfile.TemporaryDirectory() as d:
        tokenizer = build_tokenizer(Path(d) / "tokenizer")
        vae, unet, text_encoder = build_models(len(tokenizer), args.seed)
        log(f"params: vae {sum(p.numel() for p in vae.parameters())/1e6:.2f}M, unet "
            f"{sum(p.numel() for p in unet.parameters())/1e6:.2f}M, text encoder "
            f"{sum(p.numel() for p in text_encoder.parameters())/1e6:.2f}M", t0)
        if args.vae_from:  # development shortcut: reuse a trained VAE (saved with --save-vae)
            from diffusers import AutoencoderKL
            vae = AutoencoderKL.from_pretrained(args.vae_from)
            log(f"loaded VAE from {args.vae_from}", t0)
        else:
            train_vae(vae, args, t0)
            if args.save_vae:
                vae.save_pretrained(args.save_vae)
        train_unet(vae, unet, [text_encoder], tokenizer, args, t0)
        if args.decoder_steps:
            finetune_decoder(vae, args, t0)
        info = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("out", "vae_from", "save_vae", "eval_every", "decoder_only", "arch", "reuse_from")}
        info |= run_facts(t0, argv)
        save_pipeline(args.out, unet, vae, text_encoder, tokenizer, info)
    log(f"saved {args.out}", t0)


def load_reused(src: Path):
    """--arch sdxl / sd3: tiny-sd's tokenizer and (frozen) VAE from the folder `src`, which this script wrote."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    if not (src / "model_index.json").is_file():
        sys.exit(f"--reuse-from {src}: no model_index.json; expected a tiny-sd folder written by this script")
    vae = AutoencoderKL.from_pretrained(str(src / "vae")).eval()
    vae.requires_grad_(False)
    return CLIPTokenizer.from_pretrained(str(src / "tokenizer")), vae


def reused_info(arch: str, src: Path, args, extra_args: tuple = ()) -> dict:
    """training_info.json's head for --arch sdxl / sd3: the arch, where the tokenizer and VAE came from (relative to
    the repo when inside it), and the arguments that shaped the model."""
    try:
        src_name = str(src.resolve().relative_to(ROOT))
    except ValueError:
        src_name = str(src)
    keys = ("seed", "threads", "batch", "unet_steps", "images", "lr", "ema") + extra_args
    return {"arch": arch, "tokenizer_and_vae_from": src_name} | {k: v for k, v in vars(args).items() if k in keys}


def run_facts(t0: float, argv) -> dict:
    """training_info.json's tail: seconds, torch version, the held-out pairs and the command that made the model."""
    return {"train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
            "held_out_pairs": [list(x) for x in shapes.HELD_OUT_PAIRS],
            "command": "python examples/train_tiny_base.py " + " ".join(argv or sys.argv[1:])}


def main_xl(args, argv, t0):
    """--arch sdxl: stage 4 on tiny-sd's tokenizer and VAE, saved as a StableDiffusionXLPipeline."""
    src = args.reuse_from
    tokenizer, vae = load_reused(src)
    unet, text_encoder, text_encoder_2 = build_xl_models(len(tokenizer), args.seed)
    log(f"params: unet {sum(p.numel() for p in unet.parameters())/1e6:.2f}M, text encoders "
        f"{sum(p.numel() for p in text_encoder.parameters())/1e6:.2f}M + "
        f"{sum(p.numel() for p in text_encoder_2.parameters())/1e6:.2f}M; tokenizer and VAE from {src}", t0)
    train_unet(vae, unet, [text_encoder, text_encoder_2], tokenizer, args, t0)
    info = reused_info("sdxl", src, args) | {"time_ids": list(XL_TIME_IDS), "zeroed_empty_caption_share": XL_ZERO_P}
    info |= run_facts(t0, argv)
    save_pipeline(args.out, unet, vae, text_encoder, tokenizer, info, text_encoder_2=text_encoder_2, reused=src)
    log(f"saved {args.out}", t0)


def main_sd3(args, argv, t0):
    """--arch sd3: stage 4 (rectified flow) on tiny-sd's tokenizer and VAE, saved as a StableDiffusion3Pipeline."""
    from sdlora.tiny_sd3 import t5_vocab, write_t5_tokenizer

    src = args.reuse_from
    tokenizer, vae = load_reused(src)
    # StableDiffusion3Pipeline shifts latents by the VAE's shift_factor (SD1's VAE has none: 0, the identity)
    vae.register_to_config(shift_factor=vae.config.shift_factor or 0.0)
    with tempfile.TemporaryDirectory() as d:
        tokenizer_3 = write_t5_tokenizer(Path(d) / "tokenizer_3")
        models_ = build_sd3_models(len(tokenizer), len(t5_vocab()), vae.config.latent_channels, args.seed,
                                   args.sd3_layers)
        transformer, encoders = models_[0], list(models_[1:])
        log(f"params: transformer {sum(p.numel() for p in transformer.parameters())/1e6:.2f}M, text encoders "
            + " + ".join(f"{sum(p.numel() for p in te.parameters())/1e6:.2f}M" for te in encoders)
            + f"; tokenizer and VAE from {src}", t0)
        sched = train_flow(vae, transformer, encoders, [tokenizer, tokenizer, tokenizer_3], args, t0)
        info = reused_info("sd3", src, args, ("sd3_layers", "t5_lengths"))
        info |= {"objective": "rectified flow, logit-normal(0, 1) timesteps, flow target", "schedule_shift": SD3_SHIFT}
        info |= run_facts(t0, argv)
        save_sd3(args.out, transformer, encoders, vae, tokenizer_3, sched, info, src)
    log(f"saved {args.out}", t0)


def save_sd3(out: Path, transformer, encoders, vae, tokenizer_3, sched, info: dict, reused: Path):
    """StableDiffusion3Pipeline.save_pretrained (safetensors); tiny-sd's tokenizer files (as tokenizer and
    tokenizer_2) copied as they are. The transformer and the VAE (tiny-sd's, its config given shift_factor 0.0: the
    pipeline needs a number; 0 shifts nothing) are stored in fp16 so the three bundled models stay under 30 MiB;
    diffusers loads them back as fp32 unless asked otherwise. The text encoders stay fp32: transformers 5 loads a
    checkpoint in its stored dtype."""
    import copy

    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(reused / "tokenizer"))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=encoders[0],
                                    tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
                                    text_encoder_3=encoders[2], tokenizer_3=tokenizer_3)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(tmp / name)
        shutil.copytree(reused / "tokenizer", tmp / name)
    for name, model in (("transformer", transformer), ("vae", vae)):
        shutil.rmtree(tmp / name)
        copy.deepcopy(model).to(torch.float16).save_pretrained(str(tmp / name), safe_serialization=True)
        cfg = json.loads((tmp / name / "config.json").read_text())
        if cfg.pop("_name_or_path", None) is not None:  # the folder it was loaded from on the building machine
            (tmp / name / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return pipe


def decoder_only(args, t0):
    """Stage 5 alone, on a folder written by stages 1-4 (same seed -> the same weights as a full run)."""
    from diffusers import StableDiffusionPipeline

    for name in ("model_index.json", "training_info.json"):
        if not (args.decoder_only / name).is_file():
            sys.exit(f"--decoder-only {args.decoder_only}: no {name}; expected a folder written by this script")
    src = StableDiffusionPipeline.from_pretrained(str(args.decoder_only))
    finetune_decoder(src.vae, args, t0)
    info = json.loads((args.decoder_only / "training_info.json").read_text())
    info |= {k: v for k, v in vars(args).items() if k.startswith("decoder_") and k != "decoder_only"}
    info["decoder_seconds"] = round(time.time() - t0, 1)
    info["decoder_command"] = "python examples/train_tiny_base.py " + " ".join(sys.argv[1:])
    info["train_seconds"] = round(info["train_seconds"] + info["decoder_seconds"], 1)
    save_pipeline(args.out, src.unet, src.vae, src.text_encoder, src.tokenizer, info)
    log(f"saved {args.out}", t0)


if __name__ == "__main__":
    main()
