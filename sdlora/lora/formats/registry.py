"""The codecs, one module per file layout, each with the same interface: `NAME`, `CONFIG_FILE` (a config it reads
beside the weights file, or None), `detect(keys)`, `read(tensors, header, source, config)` -> Lora, `paths(folder)`
(the files `write` puts there) and `write(lora, out, header, dtype)` -> the weights file. Adding a layout is a new
module and one line in `CODECS`. `load_lora`, `parse` and `save_lora` pick the codec."""
from __future__ import annotations

from pathlib import Path

from ...errors import UserError
from ...models import TEXT_ENCODERS
from ..card import base_model_of
from . import diffusers, kohya, peft
from .checks import check_tensors, show
from .files import PEFT_WEIGHTS_NAME, read_config, read_tensors, resolve_file
from .layers import Lora
from .names import canonical

# In detection order: a file is the first layout whose `detect` accepts every key (peft's suffixes also match
# diffusers' keys).
CODECS = {c.NAME: c for c in (kohya, diffusers, peft)}
FORMATS = tuple(sorted(CODECS))


def detect_format(keys) -> str:
    keys = list(keys)
    return next((name for name, codec in CODECS.items() if keys and codec.detect(keys)), "unknown")


def load_lora(source, allow_pickle: bool = False) -> Lora:
    """Read a LoRA from a folder, a weights file or a Hub id; the format is detected from its keys.
    Every malformed file is a one-line UserError naming it (and the layer), raised before anything is used."""
    path = resolve_file(source)
    lora = _load_file(path, allow_pickle)
    for comp in TEXT_ENCODERS:  # peft folder: each text encoder's part in its subfolder (one level only)
        te = path.parent / comp / PEFT_WEIGHTS_NAME
        if te.is_file():
            part = _load_file(te, allow_pickle)
            lora.modules.update({canonical(comp, k.split(".", 1)[1]): m for k, m in part.modules.items()})
    lora.base_model = base_model_of(path.parent / "README.md") or _metadata_base_model(lora.metadata)
    return lora


def _load_file(path: Path, allow_pickle: bool) -> Lora:
    tensors, metadata = read_tensors(path, allow_pickle)
    codec = CODECS.get(detect_format(tensors))
    # a codec's config file only matters (and is only checked) for its keys
    config = read_config(path.parent / codec.CONFIG_FILE, path) if codec and codec.CONFIG_FILE else None
    return parse(tensors, metadata, source=str(path), peft_config=config)


def parse(tensors: dict, metadata: dict | None = None, source: str = "<memory>", peft_config: dict | None = None) -> Lora:
    """Tensors + header metadata -> Lora; anything malformed is a one-line UserError naming `source`.
    `peft_config`: the config file read beside them (peft's adapter_config.json)."""
    metadata = metadata or {}
    check_tensors(tensors, source)
    fmt = detect_format(tensors)
    if fmt == "unknown":
        example = show(next(iter(tensors)))
        if not any("lora" in k.lower() for k in tensors):
            raise UserError(f"{source}: not a LoRA file (no LoRA keys, e.g. {example}); expected "
                            "diffusers (unet.….lora_A/lora.down), peft (….lora_A.weight) or kohya (lora_unet_….lora_down) keys")
        raise UserError(f"{source}: unknown LoRA key layout (e.g. {example}); expected diffusers, peft or kohya keys")
    return CODECS[fmt].read(tensors, metadata, source, peft_config)


def _metadata_base_model(metadata: dict) -> str | None:
    for key in ("base_model", "sdlora_base_model", "ss_sd_model_name"):
        value = str(metadata.get(key) or "").strip()
        if value:
            return value.splitlines()[0]  # free text: keep later error messages on one line
    return None


def save_lora(lora: Lora, out, fmt: str, dtype: str | None = None) -> Path:
    """Write `lora` in `fmt` to OUT (a .safetensors file, or a folder); atomic; returns the weights file."""
    from ...models import torch_dtype

    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    cast = torch_dtype(dtype) if dtype else None
    meta = {k: v for k, v in lora.metadata.items() if k not in ("lora_adapter_metadata", "adapter_config")}
    meta["format"] = "pt"
    if lora.base_model and not _metadata_base_model(meta):
        meta["sdlora_base_model"] = lora.base_model
    return CODECS[fmt].write(lora, out, meta, cast)


def output_files(out, fmt: str) -> list[Path]:
    """The files `save_lora(…, out, fmt)` may write (a peft folder: each text encoder's part in its subfolder too;
    a model card is only ever added where none exists)."""
    out = Path(out)
    return [out] if out.suffix == ".safetensors" else CODECS[fmt].paths(out)


def check_output(out, fmt: str, overwrite: bool = False):
    """Before any work: a one-line error where `save_lora` would replace an existing file (unless `overwrite`) or
    could not write at all (a file where its folder goes, a folder where its file goes)."""
    out = Path(out)
    for file in output_files(out, fmt):
        folder = next(p for p in file.parents if p.exists() or p.is_symlink())
        if not folder.is_dir():
            raise UserError(f"{folder} exists and is a file, not a folder; choose another name (a name ending in "
                            ".safetensors writes a single file)")
        if file.is_dir():
            raise UserError(f"{file} exists and is a folder; choose another name")
        if (file.exists() or file.is_symlink()) and not overwrite:
            raise UserError(f"{file} exists; choose another name or pass --overwrite")
