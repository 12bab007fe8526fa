"""The model card (README.md) of a training run (sdlora.lora.card reads a card's base model back).

Front matter through huggingface_hub's `ModelCardData` (what the Hub parses), so `base_model`, tags
and the widget are valid YAML whatever the prompts contain.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..io import write_text
from ..lora.card import front_matter
from .facts import card_labels

TAGS = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "lora"]
XL_TAGS = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers", "text-to-image", "diffusers", "lora"]  # diffusers' SDXL scripts'


def _xl(info: dict) -> bool:
    return str(info.get("family") or "").startswith("SDXL")


QUANTIZED = {"int8": "8-bit LLM.int8()", "nf4": "4-bit NF4"}  # --quantize_base, as the card says it


def _as_is(value, info: dict):
    return value


# How a fact reads in the settings table where its value alone does not say it (None: no row).
CARD_TEXT = {
    "lora_type": lambda v, info: v if v not in (None, "lora") else None,
    "rslora": lambda v, info: v and f"yes: scale alpha/sqrt(rank), recorded as alpha {info['alpha']:g}",
    "init": lambda v, info: v and f"{v}: saved as the change from the unmodified base (twice the trained rank)",
    "target_modules": lambda v, info: ", ".join(v) if v is not None else None,
    "train_text_encoder": lambda v, info: bool(v),
    "repeat_folders": lambda v, info: v or None,
    "quantize_base": lambda v, info: v and f"{v}: trained over the UNet's Linear weights in bitsandbytes' "
                                           f"{QUANTIZED[v]}; apply it to the full-precision base",
}


def render(info: dict, front_extra: dict | None = None, settings_extra: dict | None = None) -> str:
    """A training run's card: front matter, how to load it, the settings table, the latest samples."""
    front = dict(base_model=info["base_model"] if info.get("base_model_in_front_matter", True) else None,
                 library_name="diffusers", license=info.get("license") or "creativeml-openrail-m",
                 tags=(XL_TAGS if _xl(info) else TAGS) + info.get("extra_tags", []), **(front_extra or {}))
    if info.get("samples"):
        front["widget"] = [{"text": s["prompt"], "output": {"url": s["path"]}} for s in info["samples"]]
    title = info.get("title") or f"LoRA for {info['base_model']}"
    settings = {label: CARD_TEXT.get(name, _as_is)(info.get(name), info) for name, label in card_labels().items()}
    settings.update(settings_extra or {})
    rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items() if v is not None)
    samples = ""
    if info.get("samples"):
        samples = "\n## Samples\n\n" + "\n".join(f"![{s['prompt']}]({s['path']})  \n*{s['prompt']}*" for s in info["samples"]) + "\n"
    prompt = info.get("example_prompt") or "a photo"
    return f"""{front_matter(**front)}
# {title}

LoRA weights for {_named(info)}, trained with sdlora {__version__}.

## Use it

{_snippet(info, prompt)}
{_elsewhere(info)}

## Training settings

| setting | value |
|---|---|
{rows}
{samples}"""


def _elsewhere(info: dict) -> str:
    """Where the files load besides diffusers: the kohya file (on SD3 its SD3 layout) and what the other loaders make
    of the diffusers one."""
    if _sd3(info) and not info.get("kohya_file"):  # a type kohya's fused q/k/v layers cannot hold (saving.py)
        return (f"No kohya-layout copy was written: kohya's SD3 layout fuses q/k/v, which a "
                f"{info.get('lora_type') or 'LoRA'} layer cannot be. ComfyUI and Forge read "
                f"`pytorch_lora_weights.safetensors` as it is (`sdlora inspect` says how each loader reads it)."
                f"{_trigger(info)}\n")
    if _sd3(info):  # the second file: the MMDiT's original layer names with alpha in the file (lora.formats.mmdit)
        return (f"In ComfyUI and Forge use `{info.get('kohya_file') or 'the second file'}`, the same LoRA under the "
                f"MMDiT's original layer names (as sd-scripts' SD3 trainer writes them, alpha in the file): copy it "
                f"into `ComfyUI/models/loras/`.{_trigger(info)}\nThey read `pytorch_lora_weights.safetensors` as it is "
                "too (its alpha is folded into the weights).\n")
    return (f"In ComfyUI, A1111/Forge, kohya's tools or on Civitai use `{info.get('kohya_file') or 'the kohya file'}`, the "
            f"same\nLoRA in kohya's layout: copy it into `ComfyUI/models/loras/` or `stable-diffusion-webui/models/Lora/`."
            f"{_trigger(info)}\n{_diffusers_file_elsewhere(info)}")


def _sd3(info: dict) -> bool:
    return str(info.get("family") or "").startswith("SD3")


def _diffusers_file_elsewhere(info: dict) -> str:
    """What the other loaders make of pytorch_lora_weights.safetensors (sdlora.lora.loaders, formats.to_shared)."""
    kind = info.get("lora_type", "lora")
    if kind in ("loha", "lokr"):
        return ("`pytorch_lora_weights.safetensors` is for sdlora's loader (ComfyUI and Forge read it too); A1111 and "
                "kohya's tools read none of it.\n")
    dora = ", but without its DoRA magnitudes," if kind == "dora" else ""
    return (f"`pytorch_lora_weights.safetensors` loads whole in ComfyUI and Forge too{dora} (its alpha is folded into "
            "the weights); A1111 and kohya's tools read none of it.\n")


def _named(info: dict) -> str:
    """The base model, linked only where the link exists: a Hub id (not a local path or a bundled model)."""
    from ..models import BUNDLED

    base = info["base_model"]
    if base in BUNDLED:
        return f"`{base}` (the tiny model bundled with sdlora)"
    if info.get("base_is_local"):
        return f"`{base}` (a local model)"
    return f"[{base}](https://huggingface.co/{base})"


def _snippet(info: dict, prompt: str) -> str:
    from ..models import BUNDLED

    # diffusers cannot resolve the bundled name, nor read LoHa/LoKr layers; sdlora's loader can
    if info["base_model"] in BUNDLED or info.get("lora_type") in ("loha", "lokr"):
        return f"""```python
from sdlora import load_pipeline, sample

# this folder (or its Hub repo id); the base model ({info['base_model']}) comes from this card
pipe = load_pipeline([{json.dumps(info.get('repo_id') or '.')}])
image = sample(pipe, [{json.dumps(prompt)}], seeds=[0])[0]
image.save("out.png")
```
"""
    if _sd3(info):  # the base's own FlowMatch scheduler
        return f"""```python
from diffusers import StableDiffusion3Pipeline

pipe = StableDiffusion3Pipeline.from_pretrained({json.dumps(info['base_model'])})
pipe.load_lora_weights({json.dumps(info.get('repo_id') or '.')})  # this folder, or its Hub repo id
image = pipe({json.dumps(prompt)}, num_inference_steps=28).images[0]
image.save("out.png")
```
"""
    cls = "StableDiffusionXLPipeline" if _xl(info) else "StableDiffusionPipeline"
    return f"""```python
from diffusers import {cls}, DPMSolverMultistepScheduler

pipe = {cls}.from_pretrained({json.dumps(info['base_model'])})
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
pipe.load_lora_weights({json.dumps(info.get('repo_id') or '.')})  # this folder, or its Hub repo id
image = pipe({json.dumps(prompt)}, num_inference_steps=25).images[0]
image.save("out.png")
```
"""


def _trigger(info: dict) -> str:
    phrase = info.get("trigger_phrase")
    return f" Put `{phrase}` in the prompt to call up the trained subject." if phrase else ""


def write(output_dir: Path, info: dict, front_extra: dict | None = None, settings_extra: dict | None = None) -> Path:
    path = Path(output_dir) / "README.md"
    write_text(path, render(info, front_extra, settings_extra))
    return path
