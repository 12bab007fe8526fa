"""peft's layout (`save_pretrained`): ``base_model.model.<module path>.lora_A/lora_B.weight`` (LoHa/LoKr: LyCORIS's
factor names) for one model per file, its `adapter_config.json` beside it (or its `adapter_config` header entry).
A folder holds the UNet's adapter at its root and each text encoder's in a subfolder named for it."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ...errors import UserError
from ...models import TEXT_ENCODERS
from .checks import json_value, show
from .files import PEFT_WEIGHTS_NAME, cast
from .layers import peft_magnitude
from .names import canonical, config_path
from .peftconfig import Alphas, check_config, lycoris_config_dict, peft_config_dict
from .reading import FACTORS, add, assemble

NAME = "peft"
CONFIG_FILE = "adapter_config.json"  # beside the weights file; `read` gets it as `config`


def detect(keys: list[str]) -> bool:
    return all(re.search(r"\.lora_[AB](\.\w+)?\.weight$|\.lora_magnitude_vector(\.weight)?$|\.(hada|lokr)_\w+$", k)
               for k in keys)


def read(tensors: dict, metadata: dict, source, config: dict | None = None):
    """`config`: the adapter_config.json beside the file, if any; else its header's `adapter_config`."""
    slots = {}
    for k, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(?:lora_([AB])(?:\.\w+)?\.weight|lora_magnitude_vector(?:\.weight)?"
                         rf"|({FACTORS}))", k)
        if not m:  # detect's looser search matched (e.g. nothing before ".lora_A", a trailing newline)
            raise UserError(f"{source}: unsupported peft LoRA key {show(k)}; expected <module path>.lora_A/lora_B.weight")
        comp = "text_encoder" if m.group(1).startswith(("text_model.", "encoder.layers.")) else "unet"
        which = m.group(3) or ("magnitude" if m.group(2) is None else "up" if m.group(2) == "B" else "down")
        add(slots, canonical(comp, m.group(1)), which, t, k, source)
    what = "adapter_config.json" if config is not None else "adapter_config header"
    if config is None and metadata.get("adapter_config"):
        config = json_value(metadata["adapter_config"], what, source)
    if config is not None:
        check_config(config, what, source)
    configs = {"unet": config, "text_encoder": config} if config is not None else {}
    # peft's LoKr scale is alpha / its configured r, even with both factors full
    return assemble(NAME, slots, Alphas({}, configs, what, source), metadata, source, lokr_config_scale=True)


def paths(folder: Path) -> list[Path]:
    """The files `write` may put in a folder: each text encoder's part in its subfolder."""
    return [d / n for d in (folder, *(folder / c for c in TEXT_ENCODERS)) for n in (PEFT_WEIGHTS_NAME, CONFIG_FILE)]


def write(lora, out: Path, header: dict, dtype) -> Path:
    """`lora` as peft adapters: `out` itself (…safetensors, one component only), else the UNet's in the folder `out`
    and each text encoder's in its subfolder, each with its adapter_config.json. Returns the first weights file."""
    from ...io import save_safetensors, write_text

    comps = sorted(lora.components(), key=lambda c: c != "unet")  # the UNet at the root, others in subfolders
    if out.suffix == ".safetensors" and len(comps) > 1:
        raise UserError(f"{out}: peft holds one model per file; this LoRA has {', '.join(comps)} — give a folder instead")
    first = None
    for comp in comps:
        mods = lora.component(comp)
        targets = {config_path(comp, p): m for p, m in mods.items()}
        plain = all(m.kind == "lora" for m in mods.values())
        cfg = peft_config_dict(targets) if plain else lycoris_config_dict(targets, lora.source)
        folder = out if comp == comps[0] else out / comp
        file = out if out.suffix == ".safetensors" else folder / PEFT_WEIGHTS_NAME
        save_safetensors(cast(_tensors(mods, plain), dtype), file, {**header, "adapter_config": json.dumps(cfg)})
        if out.suffix != ".safetensors":
            write_text(folder / CONFIG_FILE, json.dumps(cfg, indent=2))
        first = first or file
    return first


def _tensors(mods: dict, plain: bool) -> dict:
    """One component's layers ({path: layer}) in peft's keys."""
    tensors = {}
    for p, m in mods.items():
        if not plain:
            tensors.update({f"base_model.model.{p}.{k}": v for k, v in m.factors.items()})
            continue
        tensors[f"base_model.model.{p}.lora_A.weight"] = m.down
        tensors[f"base_model.model.{p}.lora_B.weight"] = m.up
        if m.magnitude is not None:
            tensors[f"base_model.model.{p}.lora_magnitude_vector"] = peft_magnitude(m)
    return tensors
