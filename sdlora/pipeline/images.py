"""Drawing images with a pipeline: the sizes a base allows, `generate` (image i from seed+i), `sample` (one seed per
prompt, in batches) and contact-sheet grids."""
from __future__ import annotations

from ..errors import UserError

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
    from ..models import sample_multiple, vae_factor

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
    from ..models import multiples_near

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
             guidance: float = 7.5, width=None, height=None, num_images: int = 1, clip_skip: int | None = None):
    """Images for `prompt`; image i uses seed+i, so any one can be reproduced alone. `clip_skip`: kohya's/A1111's
    (the N-th last text-encoder layer; `Adapters.clip_skip` is the one a LoRA recorded)."""
    import torch

    width, height = image_size(pipe, width, height)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
    text = clip_skip_embeds(pipe, [prompt], [negative_prompt or ""], clip_skip) or \
        dict(prompt=prompt, negative_prompt=negative_prompt)
    out = pipe(**text, num_inference_steps=steps, guidance_scale=guidance,
               width=width, height=height, num_images_per_prompt=num_images, generator=gens)
    return out.images


def clip_skip_embeds(pipe, prompts, negatives, clip_skip: int | None) -> dict | None:
    """Prompt embeddings at kohya's/A1111's clip skip N > 1 (`models.encode_prompts`: the N-th last layer through
    the final layer norm, what diffusers' SD pipeline computes for its clip_skip=N-1, whose own path fails on
    transformers' flattened CLIPTextModel); None for 1 or None, and for SDXL (which takes no clip skip here)."""
    if not clip_skip or clip_skip < 2 or getattr(pipe, "text_encoder_2", None) is not None:
        return None
    import torch

    from ..models import encode_prompts

    with torch.no_grad():
        return {"prompt_embeds": encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, clip_skip=clip_skip),
                "negative_prompt_embeds": encode_prompts(pipe.text_encoder, pipe.tokenizer, negatives,
                                                         clip_skip=clip_skip)}


def denoiser(pipe):
    """The pipeline's UNet, or SD3's MMDiT (`transformer`)."""
    return getattr(pipe, "unet", None) or pipe.transformer


def image_size(pipe, width=None, height=None) -> tuple[int, int]:
    """(width, height) to draw at: each as given, else the base's own size (its UNet's sample_size x the VAE's
    downsampling; diffusers defaults the two only when both are missing), checked against the base's multiple."""
    own = denoiser(pipe).config.sample_size
    own_h, own_w = (own, own) if isinstance(own, int) else own
    width, height = width or own_w * pipe.vae_scale_factor, height or own_h * pipe.vae_scale_factor
    check_size(width, height, dict(denoiser(pipe).config), dict(pipe.vae.config))
    return width, height


def sample(pipe, prompts, seeds, steps: int = 25, guidance: float = 7.5, batch: int = 8, encode=None,
           width=None, height=None, negative_prompts=None, on_batch=None, clip_skip: int | None = None):
    """Image i for prompts[i] from its own generator seeded seeds[i] (so it is the image a single-prompt call
    with that seed draws), `batch` images per pipeline call (about 5x faster than one per call on CPU).

    `encode(texts)`, when given, makes the prompt embeddings (e.g. with a training run's tokenizer length
    and attention mask) instead of the pipeline's own encoding: a tensor, or (embeddings, pooled embeddings)
    for SDXL. `negative_prompts` default to "". `on_batch(done, total)`, when given, is called after each
    pipeline call with the number of images drawn so far and in all (e.g. to show progress). `clip_skip`: kohya's
    (see `generate`), for the pipeline's own encoding."""
    import torch

    images = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = list(prompts[i:i + batch])
            negs = list(negative_prompts[i:i + batch]) if negative_prompts is not None else None
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch]]
            if encode is None:
                text = clip_skip_embeds(pipe, chunk, negs or [""] * len(chunk), clip_skip) or \
                    (dict(prompt=chunk) if negs is None else dict(prompt=chunk, negative_prompt=negs))
            else:
                text = _embeds(encode(chunk), "") | _embeds(encode(negs or [""] * len(chunk)), "negative_")
            images += pipe(**text, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                           width=width, height=height).images
            if on_batch is not None:
                on_batch(len(images), len(prompts))
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
