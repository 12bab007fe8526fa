"""Drawing images with an SD3 / 3.5 run's LoRA while it trains (--validation_prompt, --sample_prompts): diffusers'
StableDiffusion3Pipeline over the run's transformer and VAE, with the base's own FlowMatch schedule, conditioned as
training conditions (sd3cond). Caching releases the text encoders before the transformer loads (T5-XXL alone is
4.7 B parameters), so the prompts sampling will draw are encoded up front, while they are in memory; where the
encoders stay (the CLIPs trained, captions that change), the prompts are encoded when drawn, with the LoRA as it is."""
from __future__ import annotations

import torch

from .. import sd3base, sd3models
from . import sd3cond
from .conditioning import Text

SCHEDULER = "flow-match-euler"  # what the PNGs record: the base's FlowMatchEulerDiscreteScheduler


def prompts(config) -> list[str]:
    """Every text a run's sampling encodes: the validation prompt, each sample prompt and its negative, and "" (the
    negative prompt sampling defaults to)."""
    texts = {""} | ({config.validation_prompt} if config.validation_prompt else set())
    for p in config.sample_prompts or ():
        texts |= {p.prompt, p.negative or ""}
    return sorted(texts)


def encode_up_front(config, encode) -> dict[str, Text] | None:
    """{text: its conditioning on the CPU} of `prompts(config)`, by `encode` (sd3run.encoder over the frozen
    encoders); None where the run draws nothing."""
    if not (config.validation_prompt or config.sample_prompts):
        return None
    texts = prompts(config)
    with torch.no_grad():
        encoded = encode(texts).to("cpu")
    return {t: encoded[i:i + 1] for i, t in enumerate(texts)}


def encoder(frozen, parts: dict, device):
    """texts -> (prompt embeddings, pooled embeddings) as `pipeline.sample` takes them: the ones encoded up front
    where caching released the encoders, else the run's encoders' (the trained CLIPs with their LoRA)."""
    if frozen.text_cached:
        def cached(texts):
            text = Text.cat([frozen.sample_texts[t] for t in texts]).to(device)
            return text.embeds, text.pooled
        return cached
    encoders = [parts[n].bare if n in parts else frozen.text_encoders[n] for n in sd3base.TEXT_ENCODERS]

    def live(texts):
        text = sd3cond.encode(encoders, frozen.tokenizers, texts, frozen.max_sequence_length, frozen.joint_dim)
        return text.embeds, text.pooled
    return live


def pipeline(config, transformer, vae, tokenizers: list):
    """A StableDiffusion3Pipeline over the run's transformer and VAE, with the base's FlowMatch schedule and no text
    encoders (it is given prompt embeddings), without progress bars."""
    from diffusers import StableDiffusion3Pipeline

    scheduler = sd3models.load_scheduler(config.base, config.revision, config.cache_dir)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None,
                                    tokenizer=tokenizers[0], text_encoder_2=None, tokenizer_2=tokenizers[1],
                                    text_encoder_3=None, tokenizer_3=tokenizers[2])
    pipe.set_progress_bar_config(disable=True)
    return pipe
