"""Sample images with the LoRA being trained, on a standard pipeline with DPM-Solver, at the run's seed."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from .. import models, pipeline, sd3base
from ..io import png_bytes, write_bytes
from .config import TrainConfig
from .frozen import Frozen
from . import sd3sample
from .manifest import Manifest

log = logging.getLogger("sdlora")


@dataclass
class Sampling:
    """What drawing images with the LoRA being trained takes (main process)."""
    config: TrainConfig
    device: torch.device
    weight_dtype: torch.dtype
    frozen: Frozen  # the VAE and frozen text encoders, borrowed back from caching to sample
    parts: dict  # the trained run.Components: their bare models sample, without LoRA dropout
    seed: int
    max_length: int | None = None  # condition exactly as in training (SD 1.x/2.x only)
    use_attention_mask: bool = False
    trackers: list = field(default_factory=list)  # accelerate's: tensorboard gets the images too


@contextlib.contextmanager
def eval_mode(parts: dict):
    """The trained models in eval mode (no LoRA dropout) for sampling or the held-out loss, then back to training."""
    for part in parts.values():
        part.module.eval()
    try:
        yield
    finally:
        for part in parts.values():
            part.module.train()


@contextlib.contextmanager
def sampling(s: Sampling):
    """Yield (pipe, encode): the run's models as a pipeline, under the sampling autocast (`_autocast`), and the
    prompt encoder to pass to `pipeline.sample` (None: the pipeline's own). The VAE / text encoder caching released
    come back for it and go back afterwards; the LoRA layers sample without dropout. Main process only."""
    tokenizers = s.frozen.tokenizers
    if s.config.family == "sd3":  # StableDiffusion3Pipeline, on prompts encoded as in training (sd3sample.py)
        with s.frozen.borrowed(s.config, s.device, s.weight_dtype, skip=tuple(s.frozen.text_encoders)) as (vae, _):
            pipe = sd3sample.pipeline(s.config, s.parts["unet"].bare, vae, tokenizers)
            with eval_mode(s.parts), _autocast(s), decode_in_vae_dtype(vae, s.device):
                yield pipe, sd3sample.encoder(s.frozen, s.parts, s.device)
        return
    with s.frozen.borrowed(s.config, s.device, s.weight_dtype, skip=s.parts) as (vae, frozen_tes):
        tes = [s.parts[n].bare if n in s.parts else frozen_tes[n] for n in s.frozen.text_encoders]
        # condition exactly as in training (SD 1.x/2.x only); None: the pipeline's own prompt encoding
        encode = partial(models.encode_prompts, tes[0], tokenizers[0], max_length=s.max_length,
                         use_attention_mask=s.use_attention_mask, clip_skip=s.config.clip_skip) \
            if s.max_length or s.use_attention_mask or (s.config.clip_skip or 1) > 1 else None
        xl = dict(text_encoder_2=tes[1], tokenizer_2=tokenizers[1]) if len(tes) > 1 else {}
        pipe = pipeline.assemble(s.parts["unet"].bare, vae, tes[0], tokenizers[0], s.frozen.noise_scheduler.config,
                                 **xl)
        with eval_mode(s.parts), _autocast(s), decode_in_vae_dtype(vae, s.device):
            yield pipe, encode


def _autocast(s: Sampling):
    """Sample in the run's mixed precision; an fp32 run samples under the fast path's autocast (fp16 on a GPU, as
    diffusers' scripts validate, bf16 on a CPU that computes it natively), which draws the same images faster."""
    device = torch.device(s.device)
    dtype = s.weight_dtype if s.weight_dtype != torch.float32 else \
        models.torch_dtype(models.fast_precision(device))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@contextlib.contextmanager
def decode_in_vae_dtype(vae, device):
    """Decode latents in the VAE's own dtype, outside autocast: SDXL's VAE is kept fp32 under fp16 because it
    overflows, and fp16 autocast would run its convolutions in fp16 anyway (black samples)."""
    decode = vae.decode

    def own_dtype_decode(z, *a, **k):
        with torch.autocast(torch.device(device).type, enabled=False):
            return decode(z.to(vae.dtype), *a, **k)

    vae.decode = own_dtype_decode
    try:
        yield
    finally:
        del vae.decode  # the class's method again


def validate(s: Sampling, epoch: int) -> list[dict]:
    """`--num_validation_images` images of `--validation_prompt` with the current LoRA, saved as
    samples/epochNNNN_i.png and samples/latest_i.png (the stable names the model card shows), and sent to
    tensorboard. Returns [{"prompt", "path"}] for the card. Main process only."""
    c = s.config
    n = c.num_validation_images
    log.info("validation at epoch %d: %d image(s) of %r", epoch, n, c.validation_prompt)
    with sampling(s) as (pipe, encode):
        own = sd3base.own_guidance(pipe)  # SD3: StableDiffusion3Pipeline's default guidance
        images = pipeline.sample(pipe, [c.validation_prompt] * n, [s.seed + i for i in range(n)], batch=1,
                                 encode=encode, width=c.resolution, height=c.resolution,
                                 **({} if own is None else {"guidance": own}))
    out = Path(c.output_dir) / "samples"
    Manifest(c.output_dir).will_make(out)
    for i, img in enumerate(images):
        png = png_bytes(img)  # encoded once, written under both names
        write_bytes(out / f"epoch{epoch:04d}_{i}.png", png)
        write_bytes(out / f"latest_{i}.png", png)
    for tracker in s.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.log_images({"validation": np.stack([np.asarray(i) for i in images])}, step=epoch,
                               dataformats="NHWC")
    return [{"prompt": c.validation_prompt, "path": f"samples/latest_{i}.png"} for i in range(n)]
