"""The LoRA files a run writes: one for diffusers, one for everything else.

* `pytorch_lora_weights.safetensors`, as diffusers' own scripts write it: keys in diffusers' layout
  (`unet.….lora.down/up.weight`, `text_encoder.text_model.…`) and diffusers' `lora_adapter_metadata`
  (the peft configs, so an alpha other than the rank loads right). `pipe.load_lora_weights(dir)`.
* `<output folder name>.safetensors`: the same weights in kohya's layout (`lora_unet_…` /
  `lora_te_…` with `.lora_down` / `.lora_up` / `.alpha` tensors), the one ComfyUI, A1111/Forge,
  kohya's sd-scripts and LyCORIS read; alpha travels in the tensors, where those loaders look.

Both headers carry the training facts under kohya's `ss_*` names and the Stability AI model spec's
`modelspec.*` keys, which A1111/ComfyUI/Civitai metadata viewers show.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from .. import __version__
from ..io import save_safetensors
from ..lora import adalora, formats, inject
from .facts import header_keys, own_settings


# How a fact reads under each of its header keys where its value alone does not say it (None: no key); kohya's
# sd-scripts write these keys, so A1111-style viewers and Civitai read them as they read kohya's.
HEADER_TEXT = {
    # kohya's names for the base family, which A1111-style viewers filter on
    "ss_base_model_version": lambda v, info: base_model_version(v, info.get("prediction_type")),
    "ss_v2": lambda v, info: str("-v2-" in str(v)),  # kohya's str(bool): "True" / "False"
    # DoRA, LoHa and LoKr files are LyCORIS's (kohya's sd-scripts have none): its module name and arguments
    "ss_network_module": lambda v, info: "lycoris.kohya" if _network_args(v or "lora") else "networks.lora",
    "ss_network_args": lambda v, info: _network_args(v or "lora"),
    "ss_resolution": lambda v, info: f"({v}, {v})",
    "modelspec.resolution": lambda v, info: f"{v}x{v}",
    # kohya's layout: {folder: {n_repeats, img_count}}
    "ss_dataset_dirs": lambda v, info: v or {info.get("dataset") or "": {"n_repeats": info.get("repeats", 1),
                                                                         "img_count": info.get("num_images")}},
    "ss_zero_terminal_snr": lambda v, info: "True" if v else None,
    "sdlora_target_modules": lambda v, info: ",".join(v) if v is not None else None,
    "sdlora_train_text_encoder": lambda v, info: bool(v),
    "modelspec.architecture": lambda v, info: f"{v or 'stable-diffusion-v1'}/lora",
    "modelspec.title": lambda v, info: v or "LoRA",
    "modelspec.prediction_type": lambda v, info: {"v_prediction": "v"}.get(v, v),
    "modelspec.tags": lambda v, info: ",".join(v) if v else None,
}


def _as_is(value, info: dict):
    return value


def _kohya(value, info: dict):
    return None if value is None else str(value)


def header(info: dict) -> dict[str, str]:
    """The training facts (`info`: RunSummary.facts(), or any part of it) as the file header's metadata, under the
    keys facts.header_keys() declares, plus what the writer records of itself (safetensors values are strings)."""
    own = set(own_settings())  # recorded as kohya records a setting: str(value), "True" / "False" for a flag
    meta = {key: HEADER_TEXT.get(key, _kohya if name in own else _as_is)(info.get(name), info)
            for name, keys in header_keys().items() for key in keys}
    meta.update({"sdlora_version": __version__,
                 # Stability AI's model spec (https://github.com/Stability-AI/ModelSpec), as kohya's sd-scripts write it
                 "modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "diffusers",
                 "modelspec.date": info.get("date") or build_date()})
    return {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items() if v is not None}


def _network_args(lora_type: str) -> dict | None:
    """LyCORIS's network arguments, as it records them, for each type sdlora trains."""
    return {"dora": {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"},
            "loha": {"algo": "loha"}, "lokr": {"algo": "lokr", "factor": "-1"}}.get(lora_type)


def base_model_version(architecture: str | None, prediction_type: str | None = None) -> str:
    """kohya's `ss_base_model_version` (sd-scripts' model_util.get_model_version_str_for_sd1_sd2 and
    sdxl_model_util): sd_v1, sd_v2, with `_v` for v-parameterization (sd_v2_v), or sdxl_base_v1-0."""
    arch = str(architecture or "stable-diffusion-v1")
    if arch.startswith("stable-diffusion-3"):  # sd-scripts writes sd3_m for its SD3 models
        return "sd3_m"
    if arch.startswith("stable-diffusion-xl"):
        return "sdxl_base_v1-0"
    return ("sd_v2" if "-v2-" in arch else "sd_v1") + ("_v" if prediction_type == "v_prediction" else "")


def build_date() -> str:
    """Today (UTC), or the date of $SOURCE_DATE_EPOCH: identical runs on one day (or with it set) write
    identical bytes."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch and epoch.isdigit() \
        else datetime.datetime.now(datetime.timezone.utc)
    return when.date().isoformat()


# Folder names many runs share: a kohya file named after one alone (`lora.safetensors`, `<lora:lora:1>` in a
# prompt) would collide with every other run's in ComfyUI's or A1111's one LoRA folder.
GENERIC_NAMES = {"lora", "loras", "out", "output", "outputs", "model", "models", "result", "results", "run", "runs",
                 "checkpoint", "checkpoints", "weights", "adapter", "tmp", "temp", "latest"}


def kohya_name(output_dir) -> str:
    """The second file's name: the output folder's, which ComfyUI and A1111 show as the LoRA's name; a generic folder
    name (lora, output, …) is prefixed with its parents' names up to one that is not (demo/lora: demo-lora)."""
    folder = Path(output_dir).resolve()
    parts = [folder.name or "lora"]
    for parent in folder.parents:
        if parts[0].lower() not in GENERIC_NAMES or not parent.name:
            break
        parts.insert(0, parent.name)
    name = "-".join(parts)
    return f"{name}_kohya.safetensors" if f"{name}.safetensors" == formats.WEIGHTS_NAME else f"{name}.safetensors"


def save(path, parts: dict, info: dict, dtype=None, denoiser: str = "unet") -> tuple[dict, dict]:
    """Write the LoRA of `parts` ({"unet": (model, LoraConfig, initial weights or None), "text_encoder": …}) to
    `path`; returns its state dict and header in diffusers' own layout (what `save_kohya` takes), which the file holds
    respelled by `formats.to_shared`. `info` holds the training facts `header` records. `denoiser`: the prefix
    diffusers' loader reads for the "unet" part (SD3's is "transformer")."""
    sd, configs, packed, products = {}, {}, {}, {}
    for part, (model, config, initial) in parts.items():
        component = denoiser if part == "unet" else part
        kind = str(config.peft_type.value)
        if kind in ("LOHA", "LOKR", "ADALORA"):  # written from sdlora's own form of the layers (formats)
            mods = adalora.modules(model, component, dtype) if kind == "ADALORA" else \
                inject.product_modules(model, component, dtype)
            if kind != "ADALORA":
                products.update(mods)
            tensors, extra = formats.diffusers_tensors(formats.Lora(mods))
            sd.update(tensors)
            packed.update(json.loads(extra.get("lora_adapter_metadata", "{}")))
            continue
        sd.update(inject.lora_state_dict(model, component, dtype, initial))
        configs[component] = inject.file_config(config, converted=initial is not None)
    meta = {"format": "pt", **header(info)}
    if products:  # LoKr layers are written at scale 1 (alpha folded into lokr_w1): the header says what they hold
        meta.update(formats.network_header(formats.Lora(products)))
    if configs or packed:
        meta["lora_adapter_metadata"] = inject.adapter_metadata(configs, packed)
    # on disk in the spelling ComfyUI reads too (alpha folded into the weights); the kohya file is made from sd
    tensors, header_ = formats.to_shared(sd, meta, str(path))
    save_safetensors(tensors, path, header_)
    return sd, meta


def save_kohya(path, sd: dict, meta: dict) -> Path:
    """`save`'s LoRA again in kohya's layout (same weights, same scale, same header facts), from memory."""
    return formats.save_lora(formats.parse(sd, meta, source=str(path)), path, "kohya")
