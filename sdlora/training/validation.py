"""Sample images with the LoRA being trained, on a standard pipeline with DPM-Solver, at the run's seed."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from .. import models, pipeline
from ..io import png_bytes, write_bytes
from .manifest import Manifest

log = logging.getLogger("sdlora")


@contextlib.contextmanager
def eval_mode(run):
    """The trained models in eval mode (no LoRA dropout) for sampling or the held-out loss, then back to training."""
    for part in run.parts.values():
        part.module.eval()
    try:
        yield
    finally:
        for part in run.parts.values():
            part.module.train()


@contextlib.contextmanager
def sampling(run):
    """Yield (pipe, encode): the run's models as a pipeline, under the sampling autocast (`_autocast`), and the
    prompt encoder to pass to `pipeline.sample` (None: the pipeline's own). The VAE / text encoder caching released
    come back for it and go back afterwards; the LoRA layers sample without dropout. Main process only."""
    c, device = run.config, run.accelerator.device
    frozen = dict(revision=c.revision, variant=c.variant, cache_dir=c.cache_dir, allow_pickle=c.allow_pickle,
                  dtype=run.weight_dtype)
    # Caching may have released the VAE / text encoders (dropped on CPU, parked in RAM on GPU): bring them back.
    vae = (run.vae or models.load_vae(c.base, **{**frozen, "dtype": run.vae_dtype},
                                      vae=c.pretrained_vae_model_name_or_path)).to(device)
    frozen_tes = {n: (te or models.load_text_encoder(c.base, **frozen, subfolder=n)).to(device)
                  for n, te in run.text_encoders.items() if n not in run.parts}
    tes = [run.parts[n].bare if n in run.parts else frozen_tes[n] for n in run.text_encoders]
    encode = None
    if run.recipe.max_length or run.recipe.use_attention_mask:  # condition exactly as in training (SD 1.x/2.x only)
        def encode(texts):
            return models.encode_prompts(tes[0], run.tokenizers[0], texts, run.recipe.max_length,
                                         run.recipe.use_attention_mask)
    xl = dict(text_encoder_2=tes[1], tokenizer_2=run.tokenizers[1]) if len(tes) > 1 else {}
    pipe = pipeline.assemble(run.parts["unet"].bare, vae, tes[0], run.tokenizers[0], run.noise_scheduler.config, **xl)
    try:
        with eval_mode(run), _autocast(run), _decode_in_vae_dtype(vae, device):
            yield pipe, encode
    finally:
        # Send the helpers back where caching put them.
        run.vae = models.release(vae, device) if run.cache_latents else vae
        for n, te in frozen_tes.items():
            run.text_encoders[n] = models.release(te, device) if run.caches.embeds is not None else te


def _autocast(run):
    """Sample in the run's mixed precision; an fp32 run samples under the fast path's autocast (fp16 on a GPU, as
    diffusers' scripts validate, bf16 on a CPU that computes it natively), which draws the same images faster."""
    import torch

    device = torch.device(run.accelerator.device)
    dtype = run.weight_dtype if run.weight_dtype != torch.float32 else \
        models.torch_dtype(models.fast_precision(device))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@contextlib.contextmanager
def _decode_in_vae_dtype(vae, device):
    """Decode latents in the VAE's own dtype, outside autocast: SDXL's VAE is kept fp32 under fp16 because it
    overflows, and fp16 autocast would run its convolutions in fp16 anyway (black samples)."""
    import torch

    decode = vae.decode

    def own_dtype_decode(z, *a, **k):
        with torch.autocast(torch.device(device).type, enabled=False):
            return decode(z.to(vae.dtype), *a, **k)

    vae.decode = own_dtype_decode
    try:
        yield
    finally:
        del vae.decode  # the class's method again


def validate(run) -> list[dict]:
    """`--num_validation_images` images of `--validation_prompt` with the current LoRA, saved as
    samples/epochNNNN_i.png and samples/latest_i.png (the stable names the model card shows), and sent to
    tensorboard. Returns [{"prompt", "path"}] for the card. Main process only."""
    c = run.config
    n = c.num_validation_images
    log.info("validation at epoch %d: %d image(s) of %r", run.epoch, n, c.validation_prompt)
    with sampling(run) as (pipe, encode):
        images = pipeline.sample(pipe, [c.validation_prompt] * n, [run.seed + i for i in range(n)], batch=1,
                                 encode=encode, width=c.resolution, height=c.resolution)
    out = Path(c.output_dir) / "samples"
    Manifest(c.output_dir).will_make(out)
    for i, img in enumerate(images):
        png = png_bytes(img)  # encoded once, written under both names
        write_bytes(out / f"epoch{run.epoch:04d}_{i}.png", png)
        write_bytes(out / f"latest_{i}.png", png)
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.log_images({"validation": np.stack([np.asarray(i) for i in images])}, step=run.epoch,
                               dataformats="NHWC")
    return [{"prompt": c.validation_prompt, "path": f"samples/latest_{i}.png"} for i in range(n)]
