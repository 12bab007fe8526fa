"""The frozen models a run conditions and encodes with: tokenizers, text encoders, VAE and the noise schedule.

Caching releases the VAE / text encoders (dropped on CPU, parked in RAM on GPU: `models.release`); sampling
borrows them back for a while (`Frozen.borrowed`)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from .. import models
from ..bases import load as bases
from . import conditioning
from .config import TrainConfig

log = logging.getLogger("sdlora")


@dataclass
class Frozen:
    """The models a run does not train, and whether caching released the VAE / text encoders."""
    tokenizers: list  # one per text encoder, in conditioning order
    noise_scheduler: object
    # "text_encoder"[, "text_encoder_2"] -> the frozen encoder (None once released on CPU, or when trained)
    text_encoders: dict[str, torch.nn.Module | None]
    vae: torch.nn.Module | None  # None once released after caching (CPU), reloaded to sample
    vae_dtype: torch.dtype  # the weight dtype, except SDXL's own VAE under fp16 (it overflows): fp32
    vae_scale: float
    latents_cached: bool = False  # the VAE was released after caching the latents
    text_cached: bool = False  # the text encoders were released after caching the embeddings

    @contextlib.contextmanager
    def borrowed(self, config: TrainConfig, device, dtype: torch.dtype, skip=()):
        """Yield (VAE, {name: text encoder}) on `device`, loaded again if caching released them, and send them back
        where caching put them afterwards. `skip`: the encoders being trained (the run's own, with their LoRA)."""
        c = config
        load = dict(revision=c.revision, variant=c.variant, cache_dir=c.cache_dir, allow_pickle=c.allow_pickle,
                    dtype=dtype, base_config=c.base_config)
        vae = (self.vae or bases.part("vae", c.base, **{**load, "dtype": self.vae_dtype},
                                      vae=c.pretrained_vae_model_name_or_path)).to(device)
        tes = {n: (te or bases.part(n, c.base, **load)).to(device)
               for n, te in self.text_encoders.items() if n not in skip}
        try:
            yield vae, tes
        finally:
            self.vae = models.release(vae, device) if self.latents_cached else vae
            for n, te in tes.items():
                self.text_encoders[n] = models.release(te, device) if self.text_cached else te


def load(config: TrainConfig, device, weight_dtype: torch.dtype, main: bool) -> Frozen:
    """The tokenizers, noise schedule, text encoders and VAE, frozen on `device` (a single-file base's tokenizers and
    schedule from its --base_config)."""
    load = dict(revision=config.revision, cache_dir=config.cache_dir)
    frozen = dict(load, variant=config.variant, allow_pickle=config.allow_pickle, dtype=weight_dtype,
                  base_config=config.base_config)
    names = conditioning.text_encoder_names(config.family)
    tokenizers = [models.load_tokenizer(config.base_config or config.base, **load,
                                        subfolder=n.replace("text_encoder", "tokenizer"))
                  for n in names]
    noise_scheduler = noise_schedule(config, main)
    text_encoders = {n: bases.part(n, config.base, **frozen).to(device).requires_grad_(False)
                     for n in names}
    vae = load_vae(config, frozen, weight_dtype).to(device).requires_grad_(False)
    return Frozen(tokenizers, noise_scheduler, text_encoders, vae, vae.dtype, vae.config.scaling_factor)


def noise_schedule(config: TrainConfig, main: bool):
    """The base's noise schedule (DDPM), its prediction type overridden by --prediction_type, and rescaled to
    zero terminal SNR with --zero_terminal_snr; logged with the base's family."""
    sched = models.load_noise_scheduler(config.base_config or config.base, config.revision, config.cache_dir)
    own = sched.config.prediction_type
    if config.prediction_type:
        sched.register_to_config(prediction_type=config.prediction_type)
    if config.zero_terminal_snr:
        sched = type(sched).from_config(sched.config, rescale_betas_zero_snr=True)
    if main:  # the loss target follows the scheduler config (losses.target), as the base was trained
        override = f"; --prediction_type {config.prediction_type} overrides its scheduler's {own}" \
            if config.prediction_type and config.prediction_type != own else ""
        log.info("base model: %s%s%s", models.describe(config.family, sched.config.prediction_type), override,
                 f" ({config.prediction_type or own}{', zero terminal SNR' * config.zero_terminal_snr}: the "
                 f"checkpoint says so by {config.base_why})" if config.base_why else "")
        if config.zero_terminal_snr and sched.config.prediction_type != "v_prediction":
            log.warning("--zero_terminal_snr with %s prediction: at the last timestep there is no signal left to "
                        "predict noise from; it is meant for v-prediction (--prediction_type v_prediction)",
                        sched.config.prediction_type)
    return sched


def load_vae(config: TrainConfig, frozen: dict, weight_dtype):
    """--pretrained_vae_model_name_or_path or the base's VAE (its dtype: the one it encodes in). SDXL's own VAE
    overflows in fp16 (its config says force_upcast), so it stays fp32 there, as in diffusers' SDXL scripts."""
    maybe_upcast = config.family == "sdxl" and weight_dtype == torch.float16
    vae = bases.part("vae", config.base, **{**frozen, "dtype": torch.float32 if maybe_upcast else weight_dtype},
                          vae=config.pretrained_vae_model_name_or_path)
    if maybe_upcast and not vae.config.get("force_upcast", True):  # an fp16-safe VAE (the fp16-fix one)
        vae = vae.to(weight_dtype)
    return vae
