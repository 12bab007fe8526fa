"""What a single-file checkpoint is, from its header alone (names, shapes, metadata): the family, whether it marks
v-prediction or zero terminal SNR, and every reason it cannot be a base, each one line before any weights load."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from . import ldm

SAFE = (".safetensors",)
PICKLE = (".ckpt", ".pt", ".pth", ".bin")
SUFFIXES = SAFE + PICKLE
# A Hub file path: owner/repo/[sub/folders/]name.safetensors (or an https://huggingface.co/…/resolve|blob/… link).
_HUB_FILE = re.compile(r"^(?:https://huggingface\.co/)?([\w.-]+/[\w.-]+)/(?:(?:resolve|blob)/([\w.-]+)/)?(.+)$")
_LORA = ("lora_unet_", "lora_te", ".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "hada_w1", "lokr_w1")
_FOREIGN = {"double_blocks.": "Flux", "transformer_blocks.0.ff.net": "a DiT"}


@dataclass(frozen=True)
class Checkpoint:
    """A single-file base as its header describes it."""
    path: Path
    family: str  # "sd1", "sd2" or "sdxl"
    shapes: dict = field(repr=False)  # tensor name -> shape
    metadata: dict = field(default_factory=dict, repr=False)
    prediction_type: str | None = None  # "v_prediction" / "epsilon" where the file says so
    zero_terminal_snr: bool = False
    why: str = ""  # what in the file said the prediction type / zero terminal SNR, for the log


def is_single_file(name: str) -> bool:
    """Whether a --pretrained_model_name_or_path names one checkpoint file (local, or a Hub file path), not a
    folder or a repo id."""
    return str(name).lower().endswith(SUFFIXES) and not Path(str(name)).expanduser().is_dir()


def hub_file(name: str) -> tuple[str, str, str | None] | None:
    """(repo id, file path inside it, revision) of a Hub file path, or None."""
    m = _HUB_FILE.match(str(name))
    if not m or Path(str(name)).expanduser().exists() or str(name).startswith((".", "/", "~")):
        return None
    return m.group(1), m.group(3), m.group(2)


def header(path: Path, flag: str) -> tuple[dict, dict]:
    """(tensor name -> shape, __metadata__) of a safetensors file, or a one-line error naming what it is instead."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > min(size - 8, 100 << 20):
            raise UserError(f"{flag} {path}: not a checkpoint (no safetensors header); give a .safetensors model "
                            f"file, a diffusers folder or a Hub id")
        try:
            raw = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{flag} {path}: not a checkpoint (its safetensors header is not JSON); re-download "
                            f"it") from None
    meta = raw.pop("__metadata__", None) or {}
    try:
        end = max((int(v["data_offsets"][1]) for v in raw.values()), default=0)
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in raw.items()}
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"{flag} {path}: a damaged safetensors file (a tensor without shape or offsets); "
                        f"re-download it") from None
    if 8 + n + end > size:
        raise UserError(f"{flag} {path}: truncated ({size:,} bytes, its header describes {8 + n + end:,}); "
                        f"re-download it (an interrupted download leaves such a file)")
    return shapes, meta


def pickle_state(path: Path, flag: str) -> dict:
    """A pickle checkpoint's tensors (.ckpt's state_dict), read with torch's restricted loader."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{flag} {path}: could not read it as a pickle checkpoint "
                        f"({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None
    data = data.get("state_dict", data) if isinstance(data, dict) else {}
    return {k: v for k, v in data.items() if hasattr(v, "shape")}


def family_of(shapes: dict, path, flag: str) -> str:
    """"sd1", "sd2" or "sdxl" from the file's names and shapes; a LoRA, another architecture or no UNet is one line."""
    names = list(shapes)
    if any(m in k for k in names[:2000] for m in _LORA):
        raise UserError(f"{flag} {path}: this is a LoRA, not a base model; give the base it was trained on here and "
                        f"the LoRA as a LoRA (generate's LORA argument, --resume_from_lora)")
    if any(k.startswith(("joint_blocks.", ldm.UNET + "joint_blocks.")) for k in names):  # SAI's MMDiT names
        raise UserError(f"{flag} {path}: an SD3 / 3.5 single-file checkpoint; sdlora reads SD3 bases as diffusers "
                        "folders or Hub ids (stabilityai/stable-diffusion-3.5-medium, or the folder that diffusers' "
                        "StableDiffusion3Pipeline.from_single_file(FILE).save_pretrained(DIR) writes): give that")
    unet = [k for k in names if k.startswith(ldm.UNET)]
    if not unet:
        found = next((n for m, n in _FOREIGN.items() if any(m in k for k in names)), None)
        what = f"a {found} model" if found else "no Stable Diffusion UNet (model.diffusion_model.*)"
        raise UserError(f"{flag} {path}: unknown architecture ({what}); sdlora trains SD 1.x, SD 2.x and SDXL "
                        f"checkpoints")
    if any(k.startswith("conditioner.embedders.1.model.") for k in names) or ldm.UNET + "label_emb.0.0.weight" in shapes:
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in names):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in names):
        return "sd1"
    context = [s[1] for k, s in shapes.items() if k.startswith(ldm.UNET) and k.endswith("attn2.to_k.weight")]
    if context and context[0] in (768, 1024):
        return {768: "sd1", 1024: "sd2"}[context[0]]
    raise UserError(f"{flag} {path}: unknown architecture (a UNet without text encoders or a known cross-attention "
                    f"width); sdlora trains SD 1.x, SD 2.x and SDXL checkpoints")


def markers(shapes: dict, meta: dict) -> tuple[str | None, bool, str]:
    """(prediction type, zero terminal SNR, why) from what the file says: ComfyUI's `v_pred` / `ztsnr` marker keys
    (NoobAI-XL v-pred and other v-prediction finetunes carry them) and the model spec's `modelspec.prediction_type`."""
    why, pred = [], None
    spec = str(meta.get("modelspec.prediction_type", "")).lower()
    if "v_pred" in shapes:
        pred, _ = "v_prediction", why.append("its v_pred key")
    elif spec:
        pred = "v_prediction" if spec.startswith("v") else "epsilon" if spec.startswith("eps") else None
        if pred:
            why.append(f"its modelspec.prediction_type {spec!r}")
    zsnr = "ztsnr" in shapes
    if zsnr:
        why.append("its ztsnr key")
    return pred, zsnr, " and ".join(why)


def read(path: str | Path, allow_pickle: bool = False, flag: str = "--pretrained_model_name_or_path") -> Checkpoint:
    """A local single-file checkpoint described from its header (a pickle one only with allow_pickle)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    if path.suffix.lower() in PICKLE:
        if not allow_pickle:
            raise UserError(f"{flag} {path}: a pickle checkpoint, which can run code when loaded; pass --allow_pickle "
                            f"if you trust it, or use its .safetensors version")
        shapes, meta = {k: tuple(v.shape) for k, v in pickle_state(path, flag).items()}, {}
    else:
        shapes, meta = header(path, flag)
    family = family_of(shapes, path, flag)
    pred, zsnr, why = markers(shapes, meta)
    return Checkpoint(path, family, shapes, meta, pred, zsnr, why)
