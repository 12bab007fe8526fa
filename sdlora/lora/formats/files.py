"""Where a LoRA's weights file is (a file, a folder, a Hub id) and its raw tensors and header; writing them back.

Pickle files (.bin, .pt, …) can run code when loaded: they are refused unless the caller opts in."""
from __future__ import annotations

import re
from pathlib import Path

from ...errors import UserError
from ..card import write_minimal
from .checks import json_value

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Base models load from safetensors only (as in training); this ends the error when only pickle weights exist.
PICKLE_BASE_HINT = ("if it has only pickle (.bin) weights, which can run code, pass --allow-pickle / allow_pickle=True "
                    "if you trust it")
# What a training run writes (diffusers' name, so load_lora_weights(dir) finds it), and peft's name.
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHT_NAMES = (WEIGHTS_NAME, PEFT_WEIGHTS_NAME)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_file(source) -> Path:
    """The weights file `source` names: itself, the one LoRA file in a folder, or a Hub repo's (downloaded)."""
    p = Path(source)
    if p.is_dir():
        for name in WEIGHT_NAMES:
            if (p / name).is_file():
                return p / name
        files = sorted(p.glob("*.safetensors")) or sorted(f for s in PICKLE_SUFFIXES for f in p.glob("*" + s))
        if len(files) == 1:
            return files[0]
        raise UserError(f"{p}: expected one LoRA weights file (pytorch_lora_weights.safetensors, "
                        f"adapter_model.safetensors or a single *.safetensors), found {len(files)}")
    if p.is_file():
        return p
    source = str(source)
    if looks_like_hub_id(source):
        return from_hub(source)
    why = ""
    if HUB_ID.fullmatch(source) and Path(source.split("/")[0]).exists():  # `demo/nope` beside a demo/ folder
        why = f" ({source.split('/')[0]} exists here, so this names a local path, not a Hub id)"
    raise UserError(f"{source}: no such LoRA file or folder{why}; expected a .safetensors file, a folder or a Hub id")


def looks_like_hub_id(source: str) -> bool:
    """`user/repo`, and nothing that reads as a local path: a mistyped path must say "no such file", never go to the
    Hub. A path has more than one separator, a backslash, a leading . or ~, a weights-file suffix, or a first
    component that exists here (`demo/nope` beside a `demo/` folder)."""
    return bool(HUB_ID.fullmatch(source)) and not source.lower().endswith((".safetensors", *PICKLE_SUFFIXES)) \
        and not Path(source.split("/")[0]).exists()


def from_hub(repo: str) -> Path:
    """A Hub repo's LoRA weights file, downloaded (its model card beside it)."""
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        files = list_repo_files(repo)
        name = next((n for n in WEIGHT_NAMES if n in files), None)
        name = name or next(f for f in files if f.endswith(".safetensors") and "/" not in f)
        path = Path(hf_hub_download(repo, name))
        if "README.md" in files:
            hf_hub_download(repo, "README.md")  # lands beside the weights: base_model comes from it
        return path
    except StopIteration:
        raise UserError(f"{repo}: the Hub repo has no .safetensors LoRA file") from None
    except Exception as e:  # network, auth, missing repo: one line, never the token
        raise UserError(f"{repo}: could not fetch the LoRA from the Hub ({type(e).__name__})") from None


def read_tensors(path: Path, allow_pickle: bool) -> tuple[dict, dict]:
    """A weights file's (tensors, header); a pickle file only with `allow_pickle` (its header is empty)."""
    import torch

    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(f"{path}: refusing to load a pickle file ({path.suffix} can run arbitrary code); "
                            "expected .safetensors — convert it, or pass --allow-pickle / allow_pickle=True if you trust it")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path}: not a readable torch file ({type(e).__name__}); expected a LoRA state dict") from None
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               and v.layout == torch.strided for k, v in sd.items()):
            raise UserError(f"{path}: expected a flat dict of named dense tensors (a LoRA state dict)")
        return dict(sd), {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a valid safetensors file ({reason}); expected a LoRA .safetensors file") from None
    return tensors, metadata


def read_config(path: Path, source) -> dict | None:
    """A JSON config file beside `source` (peft's adapter_config.json): None when absent, a one-line error when
    damaged."""
    if not path.is_file():
        return None
    try:
        cfg = json_value(path.read_text(encoding="utf-8"), path.name, source)
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot read its {path.name} ({type(e).__name__}); expected a readable JSON file") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: its {path.name} is not a JSON object; the file is damaged (re-export it)")
    return cfg


def cast(tensors: dict, dtype) -> dict:
    """`tensors` with every floating-point, non-scalar one in `dtype` (None: as they are)."""
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and v.dim() else v) for k, v in tensors.items()}


def write_weights(lora, out: Path, file: Path, tensors: dict, header: dict, dtype) -> Path:
    """Save one weights `file` for `out` (itself, or a file in the folder `out`); a folder also gets a minimal model
    card naming the LoRA's base model, unless it has one."""
    from ...io import save_safetensors

    save_safetensors(cast(tensors, dtype), file, header)
    if lora.base_model and out.suffix != ".safetensors" and not (out / "README.md").exists():
        write_minimal(out, lora.base_model)
    return file
