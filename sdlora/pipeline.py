"""Inference: an unmodified StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL bases) with DPM++ and
LoRAs stacked through diffusers/peft.

sdlora reads and checks each LoRA itself (any format, shapes against the base) and hands diffusers'
`load_lora_weights` a plain peft-keyed dict with alpha/rank folded into B, so every format lands
with exactly the scale it was saved with; `set_adapters` applies the user's weights.
"""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

from .errors import UserError
from .logs import quiet
from .lora import formats
from .models import TEXT_ENCODERS, torch_dtype

SCHEDULERS = {"dpm++": {}, "dpm++-karras": {"use_karras_sigmas": True}, "keep": None}
COMPONENTS = ("unet", *TEXT_ENCODERS)
# The diffusers pipeline class of each base family (models.family_of); the rest load as StableDiffusionPipeline.
PIPELINES = {"sdxl": "StableDiffusionXLPipeline"}


def parse_spec(spec) -> tuple[str, float]:
    """'path[:weight]' (or (path, weight)) -> (path, weight); a Windows drive colon is not a weight. A weight
    that is not a finite number (nan, inf) is a one-line error: it would draw noise or black images."""
    if isinstance(spec, (tuple, list)):
        return str(spec[0]), lora_weight(spec[1], spec[0])
    spec = str(spec)
    head, sep, tail = spec.rpartition(":")
    if sep and head and not re.fullmatch(r"[A-Za-z]", head):
        try:
            weight = float(tail)
        except ValueError:
            pass
        else:
            return head, lora_weight(weight, head)
    return spec, 1.0


def lora_weight(weight, source) -> float:
    """A LoRA's weight as a float: finite, else a one-line UserError naming the LoRA."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{source}:{weight}: the LoRA's weight must be a finite number (e.g. {source}:0.8)")
    return value


def load_pipeline(loras=(), base=None, scheduler: str = "dpm++", device=None, dtype=None,
                  allow_pickle: bool = False, width=None, height=None):
    """A StableDiffusion(XL)Pipeline from `base` (or the first LoRA's card/metadata) with `loras` stacked.

    loras: paths/Hub ids, 'path:weight' strings or (path, weight) pairs; each becomes a named adapter.
    width/height: the image size that will be asked for, checked against the base's configs (`check_size`)
    before any weights load.
    """
    if isinstance(loras, (str, Path)):
        loras = [loras]
    import torch

    specs = [parse_spec(s) for s in loras]
    read = [(formats.load_lora(p, allow_pickle=allow_pickle), w) for p, w in specs]
    base = base or base_from(read)
    if width is not None or height is not None:
        from . import basecheck
        from .models import base_configs, resolve_base

        local = resolve_base(str(base), flag="base model")
        basecheck.check(local)  # a damaged config is one line naming it, not a failed size check
        _, unet_config, vae_config = base_configs(local)
        if vae_config:  # unreadable (a Hub base not cached): loading it reports why
            check_size(width, height, unet_config, vae_config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(dtype, device)
    pipe = load_base(base, dtype, allow_pickle=allow_pickle)
    set_scheduler(pipe, scheduler)
    add_loras(pipe, read)
    pipe.sdlora_base = str(base)
    return pipe.to(device)


def base_from(read) -> str:
    if not read:
        raise UserError("no base model: pass base=/--base or at least one LoRA whose model card names it")
    lora = read[0][0]
    if not lora.base_model:
        raise UserError(f"{lora.source}: the LoRA names no base model (no `base_model:` in its README.md, "
                        "no ss_sd_model_name metadata); pass base=/--base")
    return lora.base_model


def _dtype(dtype, device):
    from .models import fast_precision

    dtype = dtype or fast_precision(device)
    return torch_dtype(dtype) if isinstance(dtype, str) else dtype


def load_base(base, dtype=None, allow_pickle: bool = False, revision=None, variant=None, cache_dir=None, **kw):
    """The base pipeline (the family's class, see `PIPELINES`) from safetensors weights; pickle (.bin) weights
    only with allow_pickle, as in training. `kw` goes to `from_pretrained` (e.g. safety_checker=None)."""
    from .logs import silence_noise

    silence_noise()  # before diffusers' pipelines import transformers' image processors
    import diffusers
    import torch

    from . import basecheck, models
    from .models import base_configs, family_of, resolve_base

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
    if SCHEDULERS[name] is not None:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **SCHEDULERS[name])


# ---------------------------------------------------------------- LoRAs on a pipeline

def add_loras(pipe, loras):
    """Stack [(Lora | path, weight)] onto `pipe` as named adapters; all are checked before any is applied."""
    loras = [(lo, lora_weight(w, getattr(lo, "source", lo))) for lo, w in loras]
    loras = [(formats.load_lora(lo) if not isinstance(lo, formats.Lora) else lo, w) for lo, w in loras]
    for lora, _ in loras:
        check_fits(pipe, lora)
    registry = pipe.__dict__.setdefault("sdlora_adapters", {})
    added = []
    taken = set(registry) | {a for names in pipe.get_list_adapters().values() for a in names}
    try:
        for lora, weight in loras:
            name = _adapter_name(lora.source, taken)
            added.append(name)
            taken.add(name)
            with quiet():
                pipe.load_lora_weights(_peft_dict(lora, pipe), adapter_name=name)
            registry[name] = {"path": lora.source, "weight": weight, "format": lora.format}
    except Exception as e:
        for name in added:  # undo this call's adapters, including one that failed half-way
            registry.pop(name, None)
            with contextlib.suppress(Exception):
                pipe.delete_adapters(name)
        if isinstance(e, UserError):
            raise
        raise UserError(f"{lora.source}: diffusers could not load the LoRA ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:160]})") from None
    if registry:
        pipe.set_adapters(list(registry), [v["weight"] for v in registry.values()])
    return list(registry)


def _adapter_name(source: str, taken) -> str:
    p = Path(source)
    stem = p.parent.name if p.name in formats.WEIGHT_NAMES else p.stem
    base = re.sub(r"\W", "_", stem) or "lora"
    import torch

    if hasattr(torch.nn.Module, base):  # peft sets the adapter name as an attribute: "train", "eval", "to" clash
        base += "_lora"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _peft_dict(lora: formats.Lora, pipe) -> dict:
    """Keys diffusers loads as-is (formats.diffusers_keys); alpha/rank is folded into B so the adapter's own
    scale is 1. LoHa/LoKr layers, which diffusers cannot read, go in as the plain LoRA with exactly their change
    (lycoris.Product.as_lora)."""
    out, dtype = {}, pipe.unet.dtype
    for name, m in lora.modules.items():
        comp, path = name.split(".", 1)
        key = f"{comp}.{formats.live_path(comp, path)}"
        a, b = formats.diffusers_keys(comp)
        if m.kind != "lora":
            down, up, alpha = m.as_lora(_layer(pipe, comp, path).weight.shape)
            m = formats.Module(down, up, alpha, m.magnitude if m.magnitude is None else m.magnitude.flatten())
        out[f"{key}.{a}.weight"] = m.down.to(dtype)
        out[f"{key}.{b}.weight"] = (m.up.float() * (m.alpha / m.rank)).to(dtype)
        if m.magnitude is not None:
            out[f"{key}.{formats.magnitude_key(comp)}"] = formats.peft_magnitude(m).to(dtype)
    return out


def _layer(pipe, comp: str, path: str):
    layer = getattr(pipe, comp).get_submodule(formats.live_path(comp, path))
    return getattr(layer, "base_layer", layer)


def base_family(pipe) -> str:
    return formats.unet_family(pipe.unet.config, type(pipe).__name__)


def check_fits(pipe, lora: formats.Lora):
    """Raise a one-line UserError unless every LoRA layer exists in `pipe` with matching shape."""
    import torch

    def fail(detail):
        raise UserError(f"{lora.source}: LoRA for {formats.family(lora)} does not fit the base model "
                        f"({base_family(pipe)}): {detail}")

    for name, m in lora.modules.items():
        comp, path = name.split(".", 1)
        model = getattr(pipe, comp, None)
        if model is None:
            fail(f"the base has no {comp}")
        try:
            layer = model.get_submodule(formats.live_path(comp, path))
        except AttributeError:
            fail(f"no layer '{name}' in the base")
        layer = getattr(layer, "base_layer", layer)
        w = getattr(layer, "weight", None)
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or w is None:
            fail(f"'{name}' is a {type(layer).__name__}, expected Linear or Conv2d")
        if m.kind != "lora":  # LoHa/LoKr factors hold a conv kernel in their flattened input axis
            if (w.shape[0], w[0].numel()) != (m.out_features, m.in_features):
                fail(f"layer '{name}' has weight shape {list(w.shape)}, the {formats.LYCORIS_NAMES[m.kind]} layer expects "
                     f"[{m.out_features}, {m.in_features}] (inputs × kernel)")
            continue
        want = (m.up.shape[0], *m.down.shape[1:])
        if tuple(w.shape) != tuple(want) or (m.up.dim() == 4 and tuple(m.up.shape[2:]) != (1, 1)):
            fail(f"layer '{name}' has weight shape {list(w.shape)}, the LoRA expects {list(want)}")


# ---------------------------------------------------------------- fusing

def fuse_loras(pipe, unload: bool = False):
    """Bake the active adapters (at their weights) into the base weights for base-model speed.

    unload=True also drops the LoRA layers (nothing to unfuse afterwards): what `generate --fuse` and
    `sdlora fuse` want. Otherwise `unfuse_loras` restores the base weights bit for bit."""
    originals = {}
    for comp in _lora_components(pipe):
        for name, m in getattr(pipe, comp).named_modules():
            if hasattr(m, "base_layer") and hasattr(m, "lora_A") and not unload:
                originals[(comp, name)] = m.base_layer.weight.detach().to("cpu", copy=True)
    pipe.__dict__["sdlora_originals"] = originals  # peft's unmerge subtracts, which is not bit-exact
    with quiet():
        pipe.fuse_lora(components=_lora_components(pipe), adapter_names=pipe.get_active_adapters())
        if unload:
            pipe.unload_lora_weights()  # after fusing this keeps the merged weights and drops the LoRA layers


def unfuse_loras(pipe):
    """Undo `fuse_loras`, restoring the base weights bit for bit."""
    pipe.unfuse_lora(components=_lora_components(pipe))
    for (comp, name), w in pipe.__dict__.pop("sdlora_originals", {}).items():
        getattr(pipe, comp).get_submodule(name).base_layer.weight.data.copy_(w)


def _lora_components(pipe):
    return [c for c in COMPONENTS if getattr(getattr(pipe, c, None), "peft_config", None)]


# ---------------------------------------------------------------- generation

# diffusers' Stable Diffusion pipelines refuse a side that is not a multiple of 8 (their check_inputs), whatever
# the VAE; the UNet itself takes any latent size (it resizes on the way up).
PIPELINE_MULTIPLE = 8
# Sides up to this many times the base's own size are allowed: far beyond what these models draw well, and still
# within what attention memory allows on a large GPU; a typo such as 1000000 is refused before anything loads.
MAX_SIZE_FACTOR = 8


def size_limits(unet_config: dict, vae_config: dict) -> tuple[int, int | None]:
    """(the multiple each image side must be, the largest side or None if unknown) for a base: the VAE's
    downsampling and diffusers' 8 (`models.sample_multiple`); at most MAX_SIZE_FACTOR x the base's own size (the
    UNet's sample_size in latent pixels x the VAE's factor, diffusers' default size)."""
    from .models import sample_multiple, vae_factor

    try:
        multiple, factor = sample_multiple(vae_config), vae_factor(vae_config)
    except (KeyError, TypeError):  # an unusual layout: loading it reports the real problem
        return PIPELINE_MULTIPLE, None
    own = unet_config.get("sample_size")
    own = max(own) if isinstance(own, (list, tuple)) and own else own
    return multiple, MAX_SIZE_FACTOR * own * factor if isinstance(own, int) else None


def check_size(width, height, unet_config: dict, vae_config: dict):
    """A one-line UserError naming --width/--height unless each given side is a positive multiple of the base's
    pixel multiple and at most its largest side (`size_limits`)."""
    from .models import multiples_near

    multiple, largest = size_limits(unet_config, vae_config)
    for flag, side in (("--width", width), ("--height", height)):
        if side is None:
            continue
        if isinstance(side, bool) or not isinstance(side, int) or side < 1 or side % multiple:
            near = multiples_near(side, multiple) if isinstance(side, int) else str(multiple)
            raise UserError(f"{flag} {side}: must be a positive multiple of {multiple} for this base model (its "
                            f"VAE's downsampling and diffusers' 8); use {near}")
        if largest and side > largest:
            raise UserError(f"{flag} {side}: too large for this base model; at most {largest} ({MAX_SIZE_FACTOR}x "
                            f"its own size of {largest // MAX_SIZE_FACTOR})")


def generate(pipe, prompt: str, negative_prompt: str | None = None, seed: int = 0, steps: int = 25,
             guidance: float = 7.5, width=None, height=None, num_images: int = 1):
    """Images for `prompt`; image i uses seed+i, so any one can be reproduced alone."""
    import torch

    width, height = image_size(pipe, width, height)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
    out = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
               width=width, height=height, num_images_per_prompt=num_images, generator=gens)
    return out.images


def image_size(pipe, width=None, height=None) -> tuple[int, int]:
    """(width, height) to draw at: each as given, else the base's own size (its UNet's sample_size x the VAE's
    downsampling; diffusers defaults the two only when both are missing), checked against the base's multiple."""
    own = pipe.unet.config.sample_size
    own_h, own_w = (own, own) if isinstance(own, int) else own
    width, height = width or own_w * pipe.vae_scale_factor, height or own_h * pipe.vae_scale_factor
    check_size(width, height, dict(pipe.unet.config), dict(pipe.vae.config))
    return width, height


def sample(pipe, prompts, seeds, steps: int = 25, guidance: float = 7.5, batch: int = 8, encode=None,
           width=None, height=None, negative_prompts=None):
    """Image i for prompts[i] from its own generator seeded seeds[i] (so it is the image a single-prompt call
    with that seed draws), `batch` images per pipeline call (about 5x faster than one per call on CPU).

    `encode(texts)`, when given, makes the prompt embeddings (e.g. with a training run's tokenizer length
    and attention mask) instead of the pipeline's own encoding: a tensor, or (embeddings, pooled embeddings)
    for SDXL. `negative_prompts` default to ""."""
    import torch

    images = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = list(prompts[i:i + batch])
            negs = list(negative_prompts[i:i + batch]) if negative_prompts is not None else None
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch]]
            if encode is None:
                text = dict(prompt=chunk) if negs is None else dict(prompt=chunk, negative_prompt=negs)
            else:
                text = _embeds(encode(chunk), "") | _embeds(encode(negs or [""] * len(chunk)), "negative_")
            images += pipe(**text, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                           width=width, height=height).images
    return images


def _embeds(encoded, prefix: str) -> dict:
    """An `encode` result as pipeline arguments: prompt embeddings, and SDXL's pooled ones when it gives a pair."""
    embeds, pooled = encoded if isinstance(encoded, tuple) else (encoded, None)
    kw = {f"{prefix}prompt_embeds": embeds}
    if pooled is not None:
        kw[f"{prefix}pooled_prompt_embeds"] = pooled
    return kw


def grid(images, cols: int | None = None, scale: int = 1):
    """A contact sheet; scale > 1 enlarges it without smoothing, so tiny images stay readable.
    Images of different sizes sit centred in cells of the largest width and height, on white."""
    from PIL import Image

    cols = cols or int(len(images) ** 0.5 + 0.999)
    rows = (len(images) + cols - 1) // cols
    w, h = max(im.width for im in images), max(im.height for im in images)
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w + (w - im.width) // 2, (i // cols) * h + (h - im.height) // 2))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST) if scale != 1 else sheet


# ---------------------------------------------------------------- what each PNG records

def write_images(pipe, images, out, prompt: str, negative_prompt, seed: int, steps: int, guidance: float,
                 scheduler: str, fused: bool = False, loras: list | None = None) -> list[Path]:
    """Save `generate`'s images (image i drawn with seed+i) as out/NNNNN-SEED.png, numbered on from what `out`
    holds, each carrying its parameters; `loras` (default: the pipeline's active ones) as recorded."""
    from . import models
    from .io import save_image

    paths, _ = image_paths(out, seed, len(images))
    Path(out).mkdir(parents=True, exist_ok=True)
    if loras is None:
        loras = [{"name": n, **v} for n, v in pipe.__dict__.get("sdlora_adapters", {}).items()]
    for i, (path, im) in enumerate(zip(paths, images)):
        params = image_params(prompt, negative_prompt, seed + i, steps, guidance, im, scheduler, pipe.sdlora_base,
                              loras, fused, precision=models.precision_name(pipe.unet.dtype))
        save_image(im, path, pnginfo=png_info(params))
    return paths


def image_paths(out, seed: int, n: int) -> tuple[list[Path], Path]:
    """The names `write_images` gives n images drawn from `seed` in `out`, out/NNNNN-SEED.png numbered on from what
    it holds, and their grid's (out/NNNNN-grid.png); a one-line error, before anything is drawn, where `out` is
    not a folder or a name is taken."""
    out = Path(out)
    folder = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    if not folder.is_dir():
        raise UserError(f"--out {out}: {folder} exists and is a file, not a folder; choose another name")
    nums = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
    start = max(nums, default=-1) + 1
    paths, grid_path = [out / f"{start + i:05d}-{seed + i}.png" for i in range(n)], out / f"{start:05d}-grid.png"
    for path in paths + [grid_path] * (n > 1):
        if path.exists() or path.is_symlink():  # numbering on makes this a race with another writer
            raise UserError(f"{path} exists; choose another --out folder")
    return paths, grid_path


def image_params(prompt: str, negative_prompt, seed: int, steps: int, guidance: float, image, scheduler: str,
                 base: str, loras: list, fused: bool = False, **extra) -> dict:
    """The parameters an image was drawn with, as `sdlora generate` and training samples record them."""
    from . import __version__

    return {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps, "guidance": guidance,
            "width": image.width, "height": image.height, "scheduler": scheduler, "base": base, "loras": loras,
            "fused": fused, "sdlora_version": __version__, **extra}


def png_info(params: dict):
    """PNG text chunks: sdlora's own JSON, and the 'parameters' text A1111/ComfyUI users know."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("sdlora", json.dumps(params))
    info.add_text("parameters", a1111_text(params))
    return info


def a1111_text(p: dict) -> str:
    """The 'parameters' text A1111/ComfyUI users know, so the PNG reads well in their tools."""
    loras = "".join(f" <lora:{lo['name']}:{lo['weight']:g}>" for lo in p["loras"])
    lines = [p["prompt"] + loras]
    if p["negative_prompt"]:
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    lines.append(f"Steps: {p['steps']}, Sampler: DPM++ 2M, CFG scale: {p['guidance']:g}, Seed: {p['seed']}, "
                 f"Size: {p['width']}x{p['height']}, Model: {p['base']}")
    return "\n".join(lines)
