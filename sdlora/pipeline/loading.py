"""Loading: an unmodified StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL bases) from a base model,
with DPM++ and LoRAs stacked (`adapters.Adapters`), or assembled from components already in memory."""
from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import UserError
from ..logs import quiet
from ..lora import formats
from ..models import torch_dtype
from .adapters import Adapters, parse_spec
from .images import check_size

# DPMSolverMultistepScheduler's settings per name (None: the pipeline's own). A flow-matching base (SD3) samples with
# its own FlowMatchEulerDiscreteScheduler under dpm++ / dpm++-karras; dpm++-flow is DPM-Solver++ on its flow sigmas
# (diffusers' use_flow_sigmas, flow_prediction, the base's shift), which only such a base takes.
SCHEDULERS = {"dpm++": {}, "dpm++-karras": {"use_karras_sigmas": True},
              "dpm++-flow": {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, "keep": None}
FLOW_ONLY = "dpm++-flow"
# The diffusers pipeline class of each base family (models.family_of); the rest load as StableDiffusionPipeline.
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline"}


def load_adapters(loras=(), base=None, scheduler: str = "dpm++", device=None, dtype=None,
                  allow_pickle: bool = False, width=None, height=None, base_config=None) -> Adapters:
    """A StableDiffusion(XL)Pipeline from `base` (or the first LoRA's card/metadata) with `loras` stacked, as the
    `Adapters` that hold it (`.pipe`), its base and what each LoRA is.

    loras: paths/Hub ids, 'path:weight' strings or (path, weight) pairs; each becomes a named adapter.
    width/height: the image size that will be asked for, checked against the base's configs (`check_size`)
    before any weights load. base_config: a single-file base's configs and tokenizers (a diffusers folder or Hub id
    of its family; see bases.load).
    """
    if isinstance(loras, (str, Path)):
        loras = [loras]
    import torch

    specs = [parse_spec(s) for s in loras]
    read = [(formats.load_lora(p, allow_pickle=allow_pickle), w) for p, w in specs]
    base = base or base_from(read)
    if width is not None or height is not None:
        check_base_size(base, width, height, base_config, allow_pickle)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(dtype, device)
    pipe = load_base(base, dtype, allow_pickle=allow_pickle, base_config=base_config)
    set_scheduler(pipe, scheduler)
    adapters = Adapters(pipe, str(base))
    adapters.add(read)
    pipe.to(device)
    return adapters


def load_pipeline(loras=(), base=None, scheduler: str = "dpm++", device=None, dtype=None,
                  allow_pickle: bool = False, width=None, height=None, base_config=None):
    """`load_adapters`' pipeline alone: a plain diffusers pipeline with the LoRAs active at their weights."""
    return load_adapters(loras, base, scheduler, device, dtype, allow_pickle, width, height, base_config).pipe


def check_base_size(base, width, height, base_config=None, allow_pickle=False):
    """`check_size` against the base's own configs, read without loading any weights."""
    from .. import basecheck
    from ..bases import load
    from ..models import base_configs, resolve_base

    single = load.for_pipeline(base, base_config, allow_pickle)
    local = single[1] if single else resolve_base(str(base), flag="base model")
    basecheck.check(local)  # a damaged config is one line naming it, not a failed size check
    _, unet_config, vae_config = base_configs(local)
    if vae_config:  # unreadable (a Hub base not cached): loading it reports why
        check_size(width, height, unet_config, vae_config)


def base_from(read) -> str:
    if not read:
        raise UserError("no base model: pass base=/--base or at least one LoRA whose model card names it")
    lora = read[0][0]
    if not lora.base_model:
        raise UserError(f"{lora.source}: the LoRA names no base model (no `base_model:` in its README.md, "
                        "no ss_sd_model_name metadata); pass base=/--base")
    return lora.base_model


def _dtype(dtype, device):
    from ..models import fast_precision

    dtype = dtype or fast_precision(device)
    return torch_dtype(dtype) if isinstance(dtype, str) else dtype


def load_base(base, dtype=None, allow_pickle: bool = False, revision=None, variant=None, cache_dir=None,
              base_config=None, **kw):
    """The base pipeline (the family's class, see `PIPELINES`) from safetensors weights; pickle (.bin) weights
    only with allow_pickle, as in training. `kw` goes to `from_pretrained` (e.g. safety_checker=None). A single-file
    base loads with its `base_config` (bases.load)."""
    from ..logs import silence_noise

    silence_noise()  # before diffusers' pipelines import transformers' image processors
    import diffusers
    import torch

    from .. import basecheck, models
    from ..bases import load
    from ..models import base_configs, family_of, resolve_base

    single = load.for_pipeline(base, base_config, allow_pickle, revision, cache_dir)
    if single:
        return load.pipeline(*single, dtype, allow_pickle, **kw)
    base = resolve_base(str(base), revision, cache_dir, flag="base model")  # short names such as sdlora-tiny
    basecheck.check(base, variant=variant)  # a damaged file is one line naming it, before any weights load
    pipeline_class, unet_config, _ = base_configs(base, revision, cache_dir)
    cls = getattr(diffusers, PIPELINES.get(family_of(unet_config, pipeline_class), "StableDiffusionPipeline"))
    with quiet():
        try:
            if dtype in (torch.float16, torch.bfloat16):  # UNet and VAE cast as they are read: no fp32 copy
                load = dict(revision=revision, variant=variant, cache_dir=cache_dir, dtype=dtype,
                            allow_pickle=allow_pickle)
                with contextlib.suppress(UserError):  # e.g. pickle weights: from_pretrained says it in its words
                    kw = {"unet": models.load_unet(str(base), **load), "vae": models.load_vae(str(base), **load), **kw}
            return cls.from_pretrained(
                str(base), dtype=dtype, use_safetensors=None if allow_pickle else True, revision=revision,
                variant=variant, cache_dir=cache_dir, **kw)
        except Exception as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise UserError(f"{base}: could not load the base model ({reason}); "
                            + (formats.PICKLE_BASE_HINT if models.no_safetensors(reason) and not allow_pickle else
                               "expected a diffusers Stable Diffusion folder or Hub id")) from None


def assemble(unet, vae, text_encoder, tokenizer, scheduler_config, text_encoder_2=None, tokenizer_2=None):
    """A StableDiffusionPipeline (a StableDiffusionXLPipeline given SDXL's second text encoder) over components
    already in memory (e.g. the ones being trained), sampling with DPM++ from the base's own noise-schedule
    config, without progress bars."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config)
    if text_encoder_2 is not None:
        pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_scheduler(pipe, name: str):
    from diffusers import DPMSolverMultistepScheduler

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{name}'; expected one of {', '.join(SCHEDULERS)}")
    flow = flow_scheduler(pipe)
    if flow is not None:  # SD3: its own FlowMatch, or DPM-Solver++ on the same flow sigmas
        pipe.scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=flow.config.num_train_timesteps, flow_shift=flow.config.shift,
            **SCHEDULERS[name]) if name == FLOW_ONLY else flow
    elif name == FLOW_ONLY:
        raise UserError(f"scheduler {FLOW_ONLY} is for flow-matching bases (SD3); this base predicts noise: use dpm++ "
                        "or dpm++-karras")
    elif SCHEDULERS[name] is not None:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **SCHEDULERS[name])


def flow_scheduler(pipe):
    """A flow-matching base's own FlowMatchEulerDiscreteScheduler (kept on the pipeline while another samples), or
    None for a base that predicts noise."""
    if "FlowMatch" in type(pipe.scheduler).__name__:
        pipe.flow_match_scheduler = pipe.scheduler
    return getattr(pipe, "flow_match_scheduler", None)
