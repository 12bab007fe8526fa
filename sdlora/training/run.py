"""What a training run holds: the recipe it was handed, the models it trains, and the run state itself."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.trainset import StreamSampler, TrainSet
from .caches import Caches
from .config import TrainConfig
from .frozen import Frozen


@dataclass
class Recipe:
    """What differs between the scripts: data, loss weights per group, and model-card facts."""
    kind: str  # "text-to-image" or "dreambooth"
    data: TrainSet
    group_weights: dict[int, float] = field(default_factory=lambda: {0: 1.0})
    group_names: dict[int, str] = field(default_factory=lambda: {0: "loss"})
    dataset_desc: str = ""
    card_front: dict = field(default_factory=dict)
    card_settings: dict = field(default_factory=dict)
    max_length: int | None = None  # tokenizer length override (DreamBooth's --tokenizer_max_length)
    use_attention_mask: bool = False
    extra_tags: list[str] = field(default_factory=list)
    trigger_phrase: str | None = None  # what calls up the trained subject (DreamBooth's instance prompt)
    heldout: TrainSet | None = None  # images kept out of training, for the validation loss


@dataclass
class Component:
    """One model being trained: its peft LoRA config, the module as accelerate prepared it (maybe
    DDP-wrapped), the bare module, and its trainable LoRA parameters."""
    lora_config: object
    module: torch.nn.Module
    bare: torch.nn.Module
    params: list
    initial: dict | None = None  # PiSSA/OLoRA: the adapter as injected (inject.initial_weights), for saving
    tuner: object = None  # AdaLoRA: peft's AdaLoraModel, whose rank allocator the loop calls each step


@dataclass
class Run:
    """Everything a training run holds while it runs; built once by `setup.setup`."""
    config: TrainConfig
    recipe: Recipe
    accelerator: object
    seed: int
    settings: dict  # what a checkpoint records, so a resume can be checked against it (resume.settings)
    weight_dtype: torch.dtype
    frozen: Frozen  # tokenizers, noise scheduler, the frozen text encoders and VAE
    caches: Caches
    parts: dict[str, Component]  # "unet", and the text encoder(s) with --train_text_encoder
    optimizer: object
    lr_scheduler: object
    sampler: StreamSampler
    batches: object
    max_steps: int
    num_epochs: int
    step: int
    samples: list = field(default_factory=list)  # the latest validation images, for the model card
    heldout_cache: Caches | None = None  # held-out images' latents, for the validation loss
    best_val_loss: list | None = None  # [loss, step] of the lowest validation loss so far
    ema: object = None  # --use_ema: diffusers' EMAModel of the LoRA (ema.py)
    early_stop: object = None  # --early_stopping_patience: earlystop.EarlyStop

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def epoch(self) -> int:
        return (self.step * self.config.gradient_accumulation_steps) // self.sampler.batches_per_epoch

    def encoders(self, bare: bool = False) -> list:
        """The text encoders in conditioning order: a trained one with its LoRA, else the frozen one."""
        return [(self.parts[n].bare if bare else self.parts[n].module) if n in self.parts
                else self.frozen.text_encoders[n] for n in self.frozen.text_encoders]
