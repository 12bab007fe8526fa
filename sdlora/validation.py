"""Sample images during training with a standard pipeline and DPMSolverMultistepScheduler."""
from __future__ import annotations

from pathlib import Path

import torch

from .io import save_image


def sample(unet, vae, text_encoder, tokenizer, scheduler_config, prompts: list[str], num_images: int,
           seed: int, resolution: int, steps: int = 25, guidance: float = 7.5, encode=None):
    """Generate `num_images` per prompt with fixed seeds; returns [(prompt, PIL image), ...].

    `encode(texts)`, when given, makes the prompt embeddings (e.g. with the training run's
    tokenizer length and attention mask) instead of the pipeline's default encoding.
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler.from_config(scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    out = []
    with torch.no_grad():
        for prompt in prompts:
            for i in range(num_images):
                g = torch.Generator("cpu").manual_seed(seed + i)
                text = dict(prompt=prompt) if encode is None else dict(
                    prompt_embeds=encode([prompt]), negative_prompt_embeds=encode([""]))
                img = pipe(**text, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                           height=resolution, width=resolution).images[0]
                out.append((prompt, img))
    return out


def save(images, folder: Path, tag: str) -> list[Path]:
    paths = []
    for i, (_, img) in enumerate(images):
        p = Path(folder) / f"{tag}_{i}.png"
        save_image(img, p)
        paths.append(p)
    return paths
