"""The trained side of a run: LoRA on the UNet (and text encoders), fp32 LoRA weights, the optimizer and LR
schedule, prepared by accelerate."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora import adalora, inject
from . import conditioning, optimizers, sd3run
from .config import TrainConfig, adalora_schedule
from .run import Component


@dataclass
class Trainable:
    """What `build` makes: the trained models ("unet"[, text encoders]), the optimizer and its LR schedule."""
    parts: dict[str, Component]
    optimizer: object
    lr_scheduler: object


def trained_names(config: TrainConfig) -> list[str]:
    """The models a run puts LoRA on: the UNet, and with --train_text_encoder every text encoder."""
    return ["unet"] + list(conditioning.text_encoder_names(config.family)) * config.train_text_encoder


def build(config: TrainConfig, accelerator, unet, text_encoders: dict, lr: float, max_steps: int) -> Trainable:
    """LoRA on the UNet (and text encoders), fp32 LoRA weights, the optimizer and LR schedule, prepared."""
    from diffusers.training_utils import cast_training_params

    trained = {"unet": (unet, sd3run.targets(config) if config.family == "sd3" else config.target_modules)}
    for n in trained_names(config)[1:]:
        layers = text_encoders[n].config.num_hidden_layers
        trained[n] = (text_encoders[n], inject.text_encoder_targets(
            layers, conditioning.layers_used(n, config.family, layers)))
    configs, params, initial, tuners = _inject(config, trained, max_steps)
    # fp32 master weights for the LoRA parameters whatever the mixed precision: fp16 trainable
    # weights are what makes GradScaler fail with "Attempting to unscale FP16 gradients".
    cast_training_params([m for m, _ in trained.values()], dtype=torch.float32)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for name, (model, _) in trained.items():
            if name != "unet":
                model.gradient_checkpointing_enable()
    if config.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    optimizer, lr_scheduler = optimizers.build(config, {n: m for n, (m, _) in trained.items()}, params, lr, max_steps)
    prepared = accelerator.prepare(*[m for m, _ in trained.values()], optimizer)
    parts = {name: Component(configs[name], module, accelerator.unwrap_model(module), params[name], initial.get(name),
                             tuners.get(name)) for name, module in zip(trained, prepared[:-1])}
    if config.compile:  # training steps only: sampling and the held-out loss run the bare UNet uncompiled
        parts["unet"].module = torch.compile(parts["unet"].module)
    return Trainable(parts, prepared[-1], lr_scheduler)


def _inject(config: TrainConfig, trained: dict, max_steps: int):
    """LoRA layers into each trained model: (peft configs, trainable params, initial adapters, AdaLoRA tuners)."""
    configs, params, initial, tuners = {}, {}, {}, {}
    for name, (model, targets) in trained.items():  # the UNet first: LoRA init draws from the seeded RNG
        if config.lora_type == "adalora":  # peft's tuner object is kept: its rank allocator runs every step
            init_r, tinit, tfinal = adalora_schedule(config, max_steps)
            configs[name] = adalora.config(config.rank, config.lora_alpha, list(targets), config.lora_dropout, init_r,
                                           max_steps, tinit, tfinal, config.adalora_delta_t)
            tuners[name], params[name] = adalora.attach(model, configs[name])
            continue
        configs[name] = inject.lora_config(config.rank, config.lora_alpha, list(targets), config.lora_dropout,
                                           config.use_rslora, config.init_lora_weights, config.lora_type == "dora",
                                           config.lora_type)
        params[name] = inject.add_lora(model, configs[name])
        if config.init_lora_weights != "gaussian":  # before a resume loads the checkpoint's weights over them
            initial[name] = inject.initial_weights(model)
    return configs, params, initial, tuners
