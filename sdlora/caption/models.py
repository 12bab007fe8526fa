"""Which captioner or tagger `--model` names, from its files alone (a local folder or a Hub id), and loading it
on the device and in the precision `sdlora generate` would choose."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..hub import HUB_ID, hub_file

FAMILIES = {"blip": "BLIP", "florence2": "Florence-2", "vlm": "VLM", "wd14": "WD14 tagger"}
KNOWN = ("a BLIP, Florence-2 or image-text-to-text VLM (e.g. Qwen2.5-VL) folder, or a WD14 tagger's "
         "(model.onnx + selected_tags.csv)")


@dataclass
class Source:
    model: str  # a local folder or a Hub id, as transformers loads it
    family: str  # a FAMILIES key
    folder: Path | None = None  # the tagger's files


def family_of(config: dict, where: str) -> str:
    """The family a transformers config.json describes, or a one-line UserError."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    kind = config.get("model_type")
    if "architecture" in config and kind is None:  # timm's config.json (a WD14 v3 tagger) without model.onnx
        raise UserError(f"--model {where}: a timm tagger without model.onnx and selected_tags.csv; sdlora runs "
                        "WD14 taggers from those two files (the SmilingWolf/wd-*-tagger repos ship both)")
    if config.get("auto_map"):
        raise UserError(f"--model {where}: its config needs the repo's own code (trust_remote_code), which sdlora "
                        "does not run; use a transformers-native copy (e.g. florence-community/Florence-2-base "
                        "for microsoft/Florence-2-base)")
    if kind in ("blip", "florence2"):
        return kind
    if kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "vlm"
    raise UserError(f"--model {where}: model_type {kind!r} is not a captioner sdlora runs; give {KNOWN}")


def _read_config(path: Path, where: str) -> dict:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--model {where}: can't read its config.json ({type(e).__name__}); is the download "
                        "complete?") from None
    if not isinstance(config, dict):
        raise UserError(f"--model {where}: its config.json is not a JSON object")
    return config


def identify(model: str, token: str | None = None) -> Source:
    """What `model` is, from its config (or tag list) only: nothing heavy is loaded."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"--model {model}: not a folder; give {KNOWN}, or a Hub id")
        if (p / "selected_tags.csv").exists():
            if not (p / "model.onnx").is_file():
                raise UserError(f"--model {model}: a tagger folder without model.onnx; download it beside "
                                "selected_tags.csv")
            return Source(str(p), "wd14", p)
        if not (p / "config.json").is_file():
            raise UserError(f"--model {model}: no config.json or selected_tags.csv in it; give {KNOWN}")
        return Source(str(p), family_of(_read_config(p / "config.json", model), model))
    if model.startswith((".", "/", "~")) or not HUB_ID.match(model):
        raise UserError(f"--model {model}: no such folder, and not a valid Hub model id")
    tags = hub_file(model, "selected_tags.csv", "--model", "captioner", token=token, missing_ok=True)
    if tags:
        onnx = hub_file(model, "model.onnx", "--model", "ONNX tagger", token=token)
        return Source(model, "wd14", Path(onnx).parent)
    config = hub_file(model, "config.json", "--model", "captioner", token=token)
    return Source(model, family_of(_read_config(Path(config), model), model))


def device_and_precision(device: str | None, dtype: str | None) -> tuple[str, str]:
    """As `sdlora generate` chooses them: a CUDA GPU if there is one; fp16 there, bf16 on a CPU that computes it
    natively, fp32 otherwise."""
    import torch

    from ..models import PRECISIONS, fast_precision

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name; e.g. cuda, cuda:1 or cpu") from None
    if dtype is not None and dtype not in PRECISIONS:
        raise UserError(f"--dtype {dtype}: expected one of fp32, fp16, bf16")
    return device, dtype or fast_precision(device)


def load(source: Source, device: str, dtype: str, prompt: str | None = None, max_length: int | None = None,
         tag_options=None, token: str | None = None):
    """The loaded captioner (or tagger): called on a batch of images, it returns one caption per image."""
    if source.family == "wd14":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UserError("WD14 taggers run with onnxruntime: pip install \"sdlora[caption]\"") from None
        from .wd14 import TagOptions, Tagger

        return Tagger(source.folder, device, tag_options or TagOptions())
    from .captioners import Captioner

    return Captioner(source.model, source.family, device, dtype, prompt, max_length, token)
