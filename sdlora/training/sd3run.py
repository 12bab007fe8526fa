"""The SD3 / 3.5 side of a run: the frozen models (three text encoders, VAE, the FlowMatch schedule), the MMDiT, the
prompt conditioning, and one batch's rectified-flow loss (flow.py). setup.py and step.py call these for family
"sd3" in place of the UNet path; everything else (data, caches, LoRA, optimizer, checkpoints) is shared."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import models, quantize, sd3base, sd3models
from ..errors import UserError
from . import flow, frozen, sd3cond, sd3sample
from .config import TrainConfig, default_of

log = logging.getLogger("sdlora")
# The UNet families' noise and loss settings (config/noise.py, and the SNR / offset ones): SD3 refuses them set.
UNET_LOSS_SETTINGS = ("snr_gamma", "noise_offset", "multires_noise_iterations", "ip_noise_gamma", "min_timestep",
                      "max_timestep", "loss_type", "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred",
                      "v_pred_like_loss", "zero_terminal_snr")


@dataclass
class Sd3Frozen(frozen.Frozen):
    """`Frozen` with what SD3's latents and prompts need once the VAE / encoders are released."""
    vae_shift: float = 0.0
    max_sequence_length: int = 77
    joint_dim: int = 0  # the transformer's joint attention width: T5's tokens are zeros of it with --drop_t5
    sample_texts: dict | None = None  # the prompts sampling draws, encoded before the encoders leave (sd3sample)


def refuse_unsupported(c: TrainConfig):
    """What SD3 runs do not do yet, or do otherwise, as one line each (before any model loads)."""
    if c.upcast_before_saving and c.save_precision != "fp32":  # diffusers' flag: save in fp32 (sdlora's default)
        raise UserError(f"--upcast_before_saving saves the LoRA in fp32, --save_precision {c.save_precision} in "
                        f"{c.save_precision}; drop one")
    unused = [f for f in UNET_LOSS_SETTINGS if getattr(c, f) != default_of(f)]
    if unused:  # the rectified-flow loss has its own weighting (--weighting_scheme); these are the UNet loss's
        raise UserError(f"--{unused[0]}: a UNet noise/loss option, not used by SD3's rectified-flow loss; drop it (SD3 "
                        "weighs timesteps with --weighting_scheme)")


def load_frozen(config: TrainConfig, device, weight_dtype: torch.dtype, main: bool) -> Sd3Frozen:
    """Tokenizers, the FlowMatch schedule, the text encoders (T5 left out with --drop_t5) and the VAE, frozen."""
    c = config
    refuse_unsupported(c)
    load = dict(revision=c.revision, cache_dir=c.cache_dir)
    kw = dict(load, variant=c.variant, allow_pickle=c.allow_pickle, dtype=weight_dtype)
    names = sd3base.TEXT_ENCODERS
    tokenizers = [sd3models.load_tokenizer(c.base, n.replace("text_encoder", "tokenizer"), **load) for n in names]
    encoders = {n: None if n == "text_encoder_3" and c.drop_t5 else
                sd3models.load_text_encoder(c.base, n, **kw).to(device).requires_grad_(False) for n in names}
    vae = frozen.load_vae(config, kw, weight_dtype).to(device).requires_grad_(False)
    sched = sd3models.load_scheduler(c.base, **load)
    sched.register_to_config(prediction_type="flow")  # what the card and header record (FlowMatch has no such key)
    transformer = models.base_configs(c.base, c.revision, c.cache_dir)[1]
    if main:
        log.info("base model: %s (rectified flow, %s timesteps%s)", sd3base.variant(transformer),
                 c.weighting_scheme, "; T5 dropped: --drop_t5" if c.drop_t5 else "")
    frozen_ = Sd3Frozen(tokenizers, sched, encoders, vae, vae.dtype, vae.config.scaling_factor,
                        vae_shift=vae.config.shift_factor or 0.0, max_sequence_length=c.max_sequence_length,
                        joint_dim=transformer["joint_attention_dim"])
    frozen_.sample_texts = sd3sample.encode_up_front(c, encoder(frozen_, list(encoders.values())))
    return frozen_


def load_transformer(config: TrainConfig, accelerator, weight_dtype: torch.dtype):
    """The frozen MMDiT on the training device; with --quantize_base its Linear layers in bitsandbytes' int8/NF4, each
    quantized as it is read (quantize.load_unet), as the UNet's."""
    load = dict(revision=config.revision, variant=config.variant, cache_dir=config.cache_dir,
                allow_pickle=config.allow_pickle)
    if config.quantize_base == "none":
        return sd3models.load_transformer(config.base, dtype=weight_dtype, **load).to(accelerator.device)
    transformer, n = quantize.load_unet(config.base, config.quantize_base, accelerator.device, weight_dtype,
                                        subfolder="transformer", **load)
    if accelerator.is_main_process:
        log.info("quantized base: %d Linear layers of the transformer in %s (bitsandbytes); the rest in %s", n,
                 config.quantize_base, str(weight_dtype).replace("torch.", ""))
    return transformer.to(accelerator.device)


def encoder(frozen_: Sd3Frozen, encoders: list):
    """captions -> conditioning.Text, as StableDiffusion3Pipeline encodes them (sd3cond.encode)."""
    return lambda captions: sd3cond.encode(encoders, frozen_.tokenizers, captions, frozen_.max_sequence_length,
                                           frozen_.joint_dim)


def loss(run, posterior: torch.Tensor, mask, captions: list[str], gen: torch.Generator) -> torch.Tensor:
    """Per-sample loss of rows of one size: a VAE sample, shifted and scaled, noised at flow timesteps, predicted."""
    device, fz, dtype = run.accelerator.device, run.frozen, run.weight_dtype
    mean, logvar = posterior.chunk(2, dim=1)
    sample = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape, generator=gen)
    lat = ((sample - fz.vae_shift) * fz.vae_scale).to(device)
    noise = torch.randn(lat.shape, generator=gen).to(device)
    noised = flow.noise(fz.noise_scheduler, lat, noise, run.config, gen)
    text = run.caches.embeddings(captions) if run.caches.embeds is not None else \
        encoder(fz, run.encoders())(captions)
    with run.accelerator.autocast():
        pred = run.parts["unet"].module(hidden_states=noised.noisy.to(dtype), timestep=noised.timesteps,
                                        return_dict=False, **sd3cond.transformer_kwargs(text, device, dtype))[0]
    return flow.per_sample_loss(pred, lat, noise, noised, run.config, None if mask is None else mask.to(device))


def targets(config: TrainConfig) -> list[str]:
    """The transformer layers LoRA adapts (sd3base.lora_targets): an explicit --target_modules is used as given."""
    from .config import default_of

    given = config.target_modules if tuple(config.target_modules) != tuple(default_of("target_modules")) else None
    return sd3base.lora_targets(config.lora_layers, config.lora_blocks, given)
