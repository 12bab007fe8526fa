"""The model card (output_dir/README.md), written on every run, and the weights' header metadata."""
from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .io import write_text

TAGS = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "lora"]


def safetensors_metadata(info: dict) -> dict[str, str]:
    """Training facts for the file header; kohya's `ss_*` names where one exists, so A1111-style
    metadata viewers show them. safetensors metadata values must be strings."""
    meta = {
        "ss_sd_model_name": info["base_model"],
        "ss_base_model_version": "sd_v1",
        "ss_network_module": "networks.lora",
        "ss_network_dim": info["rank"],
        "ss_network_alpha": info["alpha"],
        "ss_steps": info["steps"],
        "ss_epoch": info.get("epochs"),
        "ss_resolution": f"({info['resolution']}, {info['resolution']})",
        "ss_learning_rate": info["learning_rate"],
        "ss_train_batch_size": info.get("train_batch_size"),
        "ss_mixed_precision": info.get("mixed_precision"),
        "ss_seed": info.get("seed"),
        # kohya's layout: {folder: {n_repeats, img_count}}
        "ss_dataset_dirs": {info.get("dataset") or "": {"n_repeats": info.get("repeats", 1), "img_count": info.get("num_images")}},
        "ss_num_train_images": info.get("num_images"),
        "ss_training_comment": info.get("kind"),
        "sdlora_version": __version__,
        "sdlora_target_modules": ",".join(info["target_modules"]),
        "sdlora_train_text_encoder": info.get("train_text_encoder", False),
    }
    return {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items() if v is not None}


def _front_matter(info: dict, extra: dict) -> str:
    lines = ["---"] + [f"base_model: {json.dumps(info['base_model'])}"] * info.get("base_model_in_front_matter", True)
    lines += ["library_name: diffusers", f"license: {info.get('license', 'creativeml-openrail-m')}", "tags:"]
    lines += [f"- {t}" for t in TAGS + info.get("extra_tags", [])]
    for k, v in extra.items():
        lines.append(f"{k}: {json.dumps(v)}")
    if info.get("samples"):
        lines.append("widget:")
        for s in info["samples"]:
            lines += [f"- text: {json.dumps(s['prompt'])}", "  output:", f"    url: {s['path']}"]
    lines.append("---")
    return "\n".join(lines)


def render(info: dict, front_extra: dict | None = None, settings_extra: dict | None = None) -> str:
    title = info.get("title") or f"LoRA for {info['base_model']}"
    settings = {
        "base model": info["base_model"], "kind": info.get("kind"), "rank": info["rank"], "alpha": info["alpha"],
        "target modules": ", ".join(info["target_modules"]),
        "text encoder LoRA": info.get("train_text_encoder", False), "steps": info["steps"],
        "epochs": info.get("epochs"), "batch size": info.get("train_batch_size"),
        "gradient accumulation": info.get("gradient_accumulation_steps"), "learning rate": info["learning_rate"],
        "LR scheduler": info.get("lr_scheduler"), "resolution": info["resolution"],
        "mixed precision": info.get("mixed_precision"), "saved precision": info.get("save_precision"),
        "dataset": info.get("dataset"), "training images": info.get("num_images"), "seed": info.get("seed"),
        **(settings_extra or {}),
    }
    rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items() if v is not None)
    samples = ""
    if info.get("samples"):
        samples = "\n## Samples\n\n" + "\n".join(f"![{s['prompt']}]({s['path']})  \n*{s['prompt']}*" for s in info["samples"]) + "\n"
    prompt = info.get("example_prompt") or "a photo"
    return f"""{_front_matter(info, front_extra or {})}

# {title}

LoRA weights for [{info['base_model']}]({_link(info['base_model'])}), trained with
[sdlora](https://github.com/sdlora/sdlora) {__version__}.

## Use it

```python
import torch
from diffusers import StableDiffusionPipeline, DPMSolverMultistepScheduler

pipe = StableDiffusionPipeline.from_pretrained({json.dumps(info['base_model'])})
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
pipe.load_lora_weights({json.dumps(info.get('repo_id') or '.')})  # this folder, or its Hub repo id
image = pipe({json.dumps(prompt)}, num_inference_steps=25).images[0]
image.save("out.png")
```

## Training settings

| setting | value |
|---|---|
{rows}
{samples}"""


def _link(base: str) -> str:
    return base if Path(base).exists() else f"https://huggingface.co/{base}"


def write(output_dir: Path, info: dict, front_extra: dict | None = None, settings_extra: dict | None = None) -> Path:
    path = Path(output_dir) / "README.md"
    write_text(path, render(info, front_extra, settings_extra))
    return path
