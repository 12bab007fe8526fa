"""kohya sd-scripts' names in a --config_file (its train_network.py flags, as its TOML files spell them), mapped to
sdlora's where the meaning is the same; a kohya setting sdlora has no equivalent for is one line naming it, never
silently dropped. Names checked against kohya-ss/sd-scripts (library/train_util.py, train_network.py)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

# kohya name -> sdlora flag, same meaning (values pass as they are)
RENAMED = {
    "network_dim": "rank", "network_alpha": "lora_alpha", "network_dropout": "lora_dropout",
    "save_every_n_steps": "checkpointing_steps", "max_train_epochs": "num_train_epochs",
    "lr_scheduler_num_cycles": "lr_num_cycles", "lr_scheduler_power": "lr_power", "min_snr_gamma": "snr_gamma",
    "xformers": "enable_xformers_memory_efficient_attention", "vae": "pretrained_vae_model_name_or_path",
    "max_data_loader_n_workers": "dataloader_num_workers", "unet_lr": "learning_rate", "flip_aug": "random_flip",
    "alpha_mask": "masked_loss", "save_last_n_steps_state": None, "log_with": "report_to",
    "caption_extention": "caption_extension",  # kohya's old misspelling, still accepted there
}
# kohya settings that are what sdlora always does: accepted when set to kohya's value that means it
ALWAYS = {"cache_latents": True, "sdpa": True, "save_state": True, "use_safetensors": True, "save_model_as": "safetensors",
          "network_train_unet_only": True, "v2": None, "persistent_data_loader_workers": None, "lowram": None,
          "highvram": None, "vae_batch_size": None, "save_state_on_train_end": True, "log_config": None,
          "no_metadata": False, "training_comment": None, "log_prefix": None, "log_tracker_name": None,
          "wandb_run_name": None, "tokenizer_cache_dir": None, "skip_cache_check": None}
# why a kohya setting has no sdlora equivalent (the default reason: none)
UNSUPPORTED = {
    "reg_data_dir": "use --dataset_config with an is_reg = true subset, or the DreamBooth recipe's --class_data_dir",
    "in_json": "kohya's fine-tuning metadata; use a metadata.jsonl or same-name caption files",
    "max_token_length": "sdlora encodes one 77-token chunk",
    "network_weights": "start from a saved LoRA: not supported", "network_train_text_encoder_only": None,
    "lr_scheduler_args": None, "lr_scheduler_type": None, "save_every_n_epochs": "use --checkpointing_steps",
    "save_last_n_epochs": None, "save_last_n_steps": "use --checkpoints_total_limit", "save_n_epoch_ratio": None,
    "save_last_n_epochs_state": None, "full_fp16": None, "full_bf16": None, "fp8_base": None, "color_aug": None,
    "face_crop_aug_range": None, "debug_dataset": None, "token_warmup_min": None, "token_warmup_step": None,
    "caption_dropout_every_n_epochs": None, "adaptive_noise_scale": None, "noise_offset_random_strength": None, "scale_weight_norms": None, "dim_from_weights": None,
    "base_weights": None, "base_weights_multiplier": None, "mem_eff_attn": "PyTorch's SDPA attention is the default",
    "no_half_vae": None, "cache_text_encoder_outputs": None, "cache_text_encoder_outputs_to_disk": None,
    "huggingface_repo_id": "use --push_to_hub --hub_model_id", "huggingface_token": "use --hub_token or $HF_TOKEN",
    "huggingface_repo_type": None, "huggingface_path_in_repo": None, "huggingface_repo_visibility": None,
    "save_state_to_huggingface": None, "resume_from_huggingface": None, "async_upload": None,
    "resume": "kohya's state folders don't load; --resume_from_checkpoint continues sdlora's checkpoints",
    "sample_sampler": "samples use the base's own scheduler", "lr_decay_steps": None, "lr_scheduler_timescale": None,
    "lr_scheduler_min_lr_ratio": None, "use_lion_optimizer": None, "fused_backward_pass": None,
    "torch_compile": "use --compile", "dynamo_backend": None, "ddp_timeout": None, "wandb_api_key": "use wandb login",
    "conditioning_data_dir": None, "secondary_separator": None, "enable_wildcard": None, "caption_prefix": None,
    "caption_suffix": None, "dataset_class": None, "dataset_repeats": None, "resize_interpolation": None,
    "cache_info": None, "disable_mmap_load_safetensors": None, "blocks_to_swap": None,
    "log_tracker_config": None, "network_multiplier": None, "skip_until_initial_step": None, "initial_epoch": None,
    "initial_step": None, "validation_seed": None, "validate_every_n_epochs": None, "max_validation_steps": None,
    "text_encoder_batch_size": None, "cpu_offload_checkpointing": None, "fp8_base_unet": None,
}
# kohya's LoRA+ ratios, given in networks.lora's network_args: sdlora's flags of the same names
LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
LYCORIS_ALGOS = {"loha": "loha", "lokr": "lokr"}  # lycoris.kohya's algo= values sdlora trains as peft's LoHa/LoKr
SAVE_PRECISION = {"float": "fp32", "fp16": "fp16", "bf16": "bf16"}


def translate(values: dict, where: str, recipe: str, flags=frozenset()) -> dict:
    """`values` (a flattened --config_file) with kohya's names and values turned into sdlora's flags; every kohya
    setting sdlora can't honour is listed, one line each, in the UserError. A key that is one of the recipe's own
    `flags` is never refused (UNSUPPORTED lists what sdlora lacked when it was written)."""
    out, bad = {}, []
    network = values.get("network_module")
    if network is not None or "network_dim" in values:  # a kohya train_network.py file: its defaults differ
        if not values.get("network_train_unet_only") and "train_text_encoder" not in values:
            out["train_text_encoder"] = True  # kohya trains the text encoder's LoRA unless told not to
        out["caption_extension"] = ".caption"  # kohya's default, unless the file names one
    for key, v in values.items():
        if key in ("network_module", "network_args"):
            continue
        if key in RENAMED:
            if RENAMED[key]:
                out[RENAMED[key]] = v
        elif key in ALWAYS:
            if ALWAYS[key] is not None and v != ALWAYS[key]:
                bad.append(f"{key} = {v!r}: sdlora always trains as kohya's {ALWAYS[key]!r}")
        elif key in UNSUPPORTED and key not in flags:
            bad.append(f"{key}: kohya's setting has no sdlora equivalent" + (f" ({UNSUPPORTED[key]})"
                                                                              if UNSUPPORTED[key] else ""))
        else:
            special = _special(key, v, values, recipe)
            if isinstance(special, str):
                bad.append(special)
            elif special is not None:
                out.update(special)
            else:
                out[key] = v
    if "unet_lr" in values:  # kohya: the UNet's rate; the text encoder's defaults to learning_rate
        out["learning_rate"] = values["unet_lr"]
        if "learning_rate" in values and "text_encoder_lr" not in values:
            out["text_encoder_lr"] = values["learning_rate"]
    if network is not None or "network_args" in values:
        lora_type, flags, problems = _network(network, values.get("network_args", []))
        out.setdefault("lora_type", lora_type)
        out.update({k: v for k, v in flags.items() if k not in values})  # a top-level key wins
        bad += problems
    if bad:
        raise UserError("\n".join(f"{where}: {line}" for line in bad))
    return out


def _special(key: str, v, values: dict, recipe: str):
    """kohya settings whose value changes form: a dict of sdlora flags, a str (the line saying why not), or None (the
    key is not kohya's: it passes as it is)."""
    if key == "resolution" and isinstance(v, str):
        sides = {s.strip() for s in v.split(",")}
        if len(sides) != 1 or not next(iter(sides)).isdigit():
            return f"resolution = {v!r}: sdlora trains square sizes (one number; buckets keep aspect ratios)"
        return {"resolution": int(sides.pop())}
    if key == "v_parameterization":
        return {"prediction_type": "v_prediction"} if v is True else {}
    if key == "save_precision" and v in SAVE_PRECISION:
        return {"save_precision": SAVE_PRECISION[v]}
    if key == "optimizer_type":
        return {"optimizer": v}  # kohya's names, as --optimizer_type takes them (training/optimizers.py)
    if key == "use_8bit_adam":
        return {"use_8bit_adam": v}
    if key == "output_name":  # kohya writes output_dir/output_name.safetensors; sdlora names that file by its folder
        return {"output_name": v}
    if key == "dataset_config" and recipe == "dreambooth":
        return "dataset_config: the text-to-image recipe reads kohya's dataset files (is_reg subsets included)"
    if key == "train_data_dir" and recipe == "dreambooth":
        return {"instance_data_dir": v}
    return None


def _network(module, args) -> tuple[str, dict, list[str]]:
    """kohya's network_module + network_args as sdlora's --lora_type and flags (LoRA+'s ratios), and the lines for
    what sdlora can't honour."""
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        return "lora", {}, [f"network_args = {args!r}: a list of \"key=value\" strings, as kohya reads it"]
    pairs = dict(a.split("=", 1) if "=" in a else (a, "") for a in args)
    pairs = {k.strip(): v.strip() for k, v in pairs.items()}
    if module in (None, "networks.lora"):
        flags, bad = {}, []
        for k, v in pairs.items():
            try:
                flags[k] = float(v) if k in LORAPLUS else None
            except ValueError:
                bad.append(f"network_args {k}={v}: a number, as kohya reads it")
            if k not in LORAPLUS:
                bad.append(f"network_args {k}: kohya's networks.lora option has no sdlora equivalent")
        return "lora", {k: v for k, v in flags.items() if v is not None}, bad
    if module == "lycoris.kohya":
        algo = pairs.pop("algo", "lora").lower()
        bad = [f"network_args {k}={v}: LyCORIS option has no sdlora equivalent" for k, v in pairs.items()]
        if algo not in LYCORIS_ALGOS:
            bad.insert(0, f"network_args algo={algo}: sdlora trains LyCORIS's loha and lokr (--lora_type)")
        return LYCORIS_ALGOS.get(algo, "lora"), {}, bad
    return "lora", {}, [f"network_module = {module!r}: sdlora trains networks.lora and lycoris.kohya (algo=loha/lokr)"]


def output_name(values: dict, where: str) -> dict:
    """kohya's output_name: the run's folder becomes output_dir/output_name, so its kohya file is
    `<output_name>.safetensors` (sdlora names that file after its folder)."""
    name = values.pop("output_name", None)
    if name is None:
        return values
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise UserError(f"{where}: output_name = {name!r}: a file name without folders")
    return {**values, "output_dir": str(Path(values.get("output_dir", ".")) / name)}
