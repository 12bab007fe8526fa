"""The LoRA file a run writes: `pytorch_lora_weights.safetensors`, as diffusers' own scripts write it.

Keys in diffusers' layout (`unet.….lora.down/up.weight`, `text_encoder.text_model.…`), diffusers'
`lora_adapter_metadata` (the peft configs, so an alpha other than the rank loads right), and the
training facts under kohya's `ss_*` names, which A1111-style metadata viewers show.
"""
from __future__ import annotations

import json

from .. import __version__
from ..io import save_safetensors
from ..lora import inject


def header(info: dict) -> dict[str, str]:
    """Training facts for the file header (safetensors metadata values must be strings)."""
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


def save(path, parts: dict, info: dict, dtype=None) -> dict:
    """Write the LoRA of `parts` ({"unet": (model, LoraConfig), "text_encoder": …}) to `path`; returns the
    state dict written. `info` holds the training facts `header` records."""
    sd, configs = {}, {}
    for component, (model, config) in parts.items():
        sd.update(inject.lora_state_dict(model, component, dtype))
        configs[component] = config
    save_safetensors(sd, path, {"format": "pt", "lora_adapter_metadata": inject.adapter_metadata(configs),
                                **header(info)})
    return sd
