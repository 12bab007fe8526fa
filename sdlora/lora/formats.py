"""LoRA file formats: read diffusers / peft / kohya (A1111, ComfyUI) files into one form, write any of them.

In memory a LoRA is ``{"<component>.<path>": Module(down, up, alpha)}`` where component is
``unet``, ``text_encoder`` or ``text_encoder_2`` and path is the diffusers module path. Text-encoder
paths use the classic ``text_model.…`` spelling that every file in the wild uses; `live_path`
maps them onto the installed transformers' module tree. kohya files of SDXL name UNet layers as
kohya's sd-scripts do, by the original (SGM) UNet (`_sgm_pairs`). A module's weight change is
``up @ down * alpha / rank`` (conv: ``down`` holds the kernel, ``up`` is 1×1, as in kohya LoCon). A DoRA
module also has a magnitude per output channel: the layer's weight becomes ``m * V / |V|`` row by row, with
``V = W + up @ down * alpha / rank`` (peft's DoRA; kohya/LyCORIS files call it ``dora_scale``).
"""
from __future__ import annotations

import collections
import json
import math
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..models import TEXT_CLASSES, TEXT_ENCODERS
from ..output.modelcard import base_model_of, write_minimal
from .lycoris import KEYS as LYCORIS_KEYS
from .lycoris import NAMES as LYCORIS_NAMES
from .lycoris import Product, dora_change, fold_scale

if TYPE_CHECKING:  # torch is imported lazily so `sdlora --help` stays fast
    import torch

FORMATS = ("diffusers", "kohya", "peft")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Base models load from safetensors only (as in training); this ends the error when only pickle weights exist.
PICKLE_BASE_HINT = ("if it has only pickle (.bin) weights, which can run code, pass --allow-pickle / allow_pickle=True "
                    "if you trust it")
# What a training run writes (diffusers' name, so load_lora_weights(dir) finds it), and peft's name.
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
WEIGHT_NAMES = (WEIGHTS_NAME, "adapter_model.safetensors")
_KOHYA_PREFIX = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
# Module-name words that contain "_": kohya flattens every "." to "_", so these are glued back.
_COMPOUNDS = sorted("""down_blocks up_blocks mid_block transformer_blocks to_q to_k to_v to_out proj_in proj_out
    time_emb_proj conv_shortcut conv_in conv_out conv_norm_out time_embedding linear_1 linear_2 add_embedding
    text_model self_attn q_proj k_proj v_proj out_proj text_projection input_blocks output_blocks middle_block
    in_layers out_layers emb_layers skip_connection time_embed label_emb""".split(), key=len, reverse=True)


@dataclass
class Module:
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float
    magnitude: torch.Tensor | None = None  # DoRA: [out]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    kind = "lora"

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def in_features(self) -> int:
        """Inputs × kernel elements (a conv layer's flattened input axis)."""
        return self.down.flatten(1).shape[1]

    def parameters(self) -> int:
        return self.down.numel() + self.up.numel() + (0 if self.magnitude is None else self.magnitude.numel())

    def delta(self, weight: torch.Tensor | None = None) -> "torch.Tensor":
        """The weight change this module adds at weight 1, in fp32, shaped like the layer's weight. A DoRA
        module's depends on the layer's base `weight`."""
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)
        d = d.reshape(self.up.shape[0], *self.down.shape[1:]) * (self.alpha / self.rank)
        return d if self.magnitude is None else dora_change(d, weight, self.magnitude)


@dataclass
class Lora:
    modules: dict[str, Module]
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "diffusers"
    source: str = "<memory>"
    base_model: str | None = None

    def components(self) -> list[str]:
        return sorted({k.split(".", 1)[0] for k in self.modules})


# ---------------------------------------------------------------- reading

def load_lora(source, allow_pickle: bool = False) -> Lora:
    """Read a LoRA from a folder, a weights file or a Hub id; the format is detected from its keys.
    Every malformed file is a one-line UserError naming it (and the layer), raised before anything is used."""
    path = resolve_file(source)
    lora = _load_file(path, allow_pickle)
    for comp in TEXT_ENCODERS:  # peft folder: each text encoder's part in its subfolder (one level only)
        te = path.parent / comp / "adapter_model.safetensors"
        if te.is_file():
            part = _load_file(te, allow_pickle)
            lora.modules.update({canonical(comp, k.split(".", 1)[1]): m for k, m in part.modules.items()})
    lora.base_model = base_model_of(path.parent / "README.md") or _metadata_base_model(lora.metadata)
    return lora


def _load_file(path: Path, allow_pickle: bool) -> Lora:
    tensors, metadata = _read_tensors(path, allow_pickle)
    config = None
    if detect_format(tensors) == "peft":  # adapter_config.json only matters (and is only checked) for peft keys
        config = _read_config(path.parent / "adapter_config.json", path)
    return parse(tensors, metadata, source=str(path), peft_config=config)


def resolve_file(source) -> Path:
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
        return _from_hub(source)
    why = ""
    if _HUB_ID.fullmatch(source) and Path(source.split("/")[0]).exists():  # `demo/nope` beside a demo/ folder
        why = f" ({source.split('/')[0]} exists here, so this names a local path, not a Hub id)"
    raise UserError(f"{source}: no such LoRA file or folder{why}; expected a .safetensors file, a folder or a Hub id")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(source: str) -> bool:
    """`user/repo`, and nothing that reads as a local path: a mistyped path must say "no such file", never go to the
    Hub. A path has more than one separator, a backslash, a leading . or ~, a weights-file suffix, or a first
    component that exists here (`demo/nope` beside a `demo/` folder)."""
    return bool(_HUB_ID.fullmatch(source)) and not source.lower().endswith((".safetensors", *PICKLE_SUFFIXES)) \
        and not Path(source.split("/")[0]).exists()


def _from_hub(repo: str) -> Path:
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


def _read_tensors(path: Path, allow_pickle: bool):
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


def _read_config(path: Path, source) -> dict | None:
    """peft's adapter_config.json beside `source`: None when absent, a one-line error when damaged."""
    if not path.is_file():
        return None
    try:
        cfg = _json(path.read_text(encoding="utf-8"), path.name, source)
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot read its {path.name} ({type(e).__name__}); expected a readable JSON file") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: its {path.name} is not a JSON object; the file is damaged (re-export it)")
    return cfg


def _json(text, what: str, source):
    """Parse JSON from a header entry or config file; damage is a one-line error (deep nesting included)."""
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError) as e:
        reason = getattr(e, "msg", type(e).__name__)
        raise UserError(f"{source}: its {what} is not valid JSON ({reason}); the file is damaged (re-export it)") from None


def _show(value, limit: int = 100) -> str:
    """User data inside a one-line message: quoted, escaped (no raw newline), cut short."""
    s = repr(value)
    return s if len(s) <= limit else s[:limit] + "…"


def _metadata_base_model(metadata: dict) -> str | None:
    for key in ("base_model", "sdlora_base_model", "ss_sd_model_name"):
        value = str(metadata.get(key) or "").strip()
        if value:
            return value.splitlines()[0]  # free text: keep later error messages on one line
    return None


def detect_format(keys) -> str:
    keys = list(keys)
    if keys and all(re.match(r"lora_(unet|te[12]?)_", k) for k in keys):
        return "kohya"
    if keys and all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "diffusers"
    if keys and all(re.search(r"\.lora_[AB](\.\w+)?\.weight$|\.lora_magnitude_vector(\.weight)?$|\.(hada|lokr)_\w+$", k)
                    for k in keys):
        return "peft"
    return "unknown"


def parse(tensors: dict, metadata: dict | None = None, source: str = "<memory>", peft_config: dict | None = None) -> Lora:
    """Tensors + header metadata -> Lora; anything malformed is a one-line UserError naming `source`."""
    import torch

    metadata = metadata or {}
    if not tensors:
        raise UserError(f"{source}: the file holds no tensors; expected a LoRA .safetensors file")
    for k, t in tensors.items():
        if not isinstance(k, str) or not isinstance(t, torch.Tensor):
            raise UserError(f"{source}: entry {_show(k)} is not a named tensor; expected a LoRA state dict")
    fmt = detect_format(tensors)
    if fmt == "unknown":
        example = _show(next(iter(tensors)))
        if not any("lora" in k.lower() for k in tensors):
            raise UserError(f"{source}: not a LoRA file (no LoRA keys, e.g. {example}); expected "
                            "diffusers (unet.….lora_A/lora.down), peft (….lora_A.weight) or kohya (lora_unet_….lora_down) keys")
        raise UserError(f"{source}: unknown LoRA key layout (e.g. {example}); expected diffusers, peft or kohya keys")
    pairs = {"kohya": _kohya_pairs, "diffusers": _diffusers_pairs, "peft": _peft_pairs}[fmt](tensors, source)
    alphas = _alphas(fmt, tensors, metadata, peft_config, source)
    padding = _json(metadata.get(_PADDING_KEY, "[]"), f"{_PADDING_KEY} header", source)
    if not isinstance(padding, list) or not all(isinstance(n, str) for n in padding):
        raise UserError(f"{source}: its {_PADDING_KEY} header is not a list of layer names; the file is damaged (re-export it)")
    modules = {}
    for name, slot in pairs.items():
        if any(k in _FACTOR_KINDS for k in slot):
            modules[name] = _product(source, name, slot, alphas, fmt)
            continue
        down, up, mag = slot.get("down"), slot.get("up"), slot.get("magnitude")
        _check_weights(source, name, down, up)
        magnitude = _check_magnitude(source, name, mag, up.shape[0], fmt) if mag is not None else None
        alphas.check_rank(name, "lora", down.shape[0])
        modules[name] = _check_scale(source, name, Module(down, up, alphas(name, down.shape[0]), magnitude))
    for name in padding:  # zero padding written by _pad_text_encoder
        if name in modules and not modules[name].up.any() and not modules[name].down.any():
            del modules[name]
    if not modules:
        raise UserError(f"{source}: no LoRA layer has both down and up weights; expected a LoRA file")
    metadata = {k: v for k, v in metadata.items() if k != _PADDING_KEY}
    return Lora(modules, metadata, fmt, source)


def _check_weights(source, name, down, up):
    """Refuse what would crash later or silently ruin images: a missing half, wrong dims or dtype, NaN/Inf."""
    import torch

    where = f"{source}: layer {_show(name)}"
    if down is None and up is None:
        raise UserError(f"{where} has only a DoRA magnitude (no down/up weights); expected both")
    if down is None or up is None:
        have, miss = ("down", "up") if up is None else ("up", "down")
        raise UserError(f"{where} has only its {have} weight (no {miss} weight); expected both")
    for t in (down, up):
        if not t.is_floating_point():
            raise UserError(f"{where} has {str(t.dtype).replace('torch.', '')} weights; expected floating point (fp32/fp16/bf16)")
    if (down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] or 0 in down.shape
            or 0 in up.shape or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1))):
        shapes = [list(down.shape), list(up.shape)]
        raise UserError(f"{where} has mismatched down/up weights {shapes}; expected [r, in] and [out, r] "
                        "(conv: [r, in, kh, kw] and [out, r, 1, 1])")
    for t in (down, up):  # isfinite has no 1-byte float kernels: widen those
        if not torch.isfinite(t if t.element_size() > 1 else t.float()).all():
            raise UserError(f"{where} has NaN/Inf weights; the file is damaged (retrain or re-export it)")


def _check_magnitude(source, name, mag, out: int, fmt):
    """A DoRA magnitude as [out]: peft's [out] (conv [1, out, 1, 1]), LyCORIS's output-axis dora_scale [out, 1(, 1, 1)]."""
    import torch

    where = f"{source}: layer {_show(name)}"
    if fmt == "kohya" and mag.dim() >= 2 and mag.shape[0] == 1 and mag.shape[1] != 1 and out != 1:
        raise UserError(f"{where} has an input-axis dora_scale {list(mag.shape)} (LyCORIS before 3.2, wd_on_out=False); "
                        f"sdlora applies DoRA per output channel (peft, LyCORIS >= 3.2): expected [{out}, 1]")
    if not mag.is_floating_point():
        raise UserError(f"{where} has a {str(mag.dtype).replace('torch.', '')} DoRA magnitude; expected floating point")
    if mag.numel() != out or max(mag.shape, default=1) != out:
        raise UserError(f"{where} has a DoRA magnitude of shape {list(mag.shape)}; expected {out} values, one per "
                        f"output channel")
    if not torch.isfinite(mag.float()).all():
        raise UserError(f"{where} has NaN/Inf weights; the file is damaged (retrain or re-export it)")
    return mag.reshape(out)


def _check_scale(source, name, m: Module) -> Module:
    """Finite but absurd weights (a flipped exponent bit) make up @ down overflow. Bound every entry of the
    product by |row of up| * |column of down| (Cauchy-Schwarz), in float64 so the bound cannot overflow."""
    bound = m.up.double().flatten(1).norm(dim=1).max() * m.down.double().flatten(1).norm(dim=0).max()
    if bound * m.alpha / m.rank > 1e38:
        raise UserError(f"{source}: layer {_show(name)} has weights so large that its weight change overflows "
                        "float32; the file is damaged (retrain or re-export it)")
    return m


def _positive(value, what: str, source) -> float:
    """A finite number > 0 (a JSON number, not a bool or string), else a one-line error."""
    try:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < float(value) < math.inf
    except OverflowError:  # a huge JSON integer
        ok = False
    if not ok:
        raise UserError(f"{source}: {what} is {_show(value)}; expected a positive number")
    return float(value)


_FACTOR_KINDS = {k: kind for kind, keys in LYCORIS_KEYS.items() for k in keys}
_FACTORS = "|".join(_FACTOR_KINDS)


def _add(pairs, name, which: str, t, key, source):
    """which: "down", "up", "magnitude", or a LoHa/LoKr factor's name."""
    slot = pairs.setdefault(name, {})
    if which in slot:  # two spellings of one weight: which one is meant is unknowable
        raise UserError(f"{source}: layer {_show(name)} has two {which} weights (one is "
                        f"{_show(key)}); expected one key per weight")
    slot[which] = t


def _product(source, name, slot, alphas, fmt):
    """A LoHa/LoKr layer from its factors, checked: one kind, every factor it needs, shapes that multiply, finite."""
    import torch

    where = f"{source}: layer {_show(name)}"
    kinds = {_FACTOR_KINDS.get(k, "lora") for k in slot if k != "magnitude"}
    if len(kinds) > 1:
        raise UserError(f"{where} mixes {' and '.join(sorted(LYCORIS_NAMES.get(k, 'LoRA') for k in kinds))} weights; "
                        "expected one kind of layer")
    kind = kinds.pop()
    factors = {k: v for k, v in slot.items() if k != "magnitude"}
    need = (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if kind == "loha" else
            ("lokr_w1" if "lokr_w1" in factors else "lokr_w1_a", "lokr_w1_b" if "lokr_w1" not in factors else "lokr_w1",
             "lokr_w2" if "lokr_w2" in factors else "lokr_w2_a", "lokr_w2_b" if "lokr_w2" not in factors else "lokr_w2"))
    missing = [k for k in need if k not in factors]
    if missing:
        raise UserError(f"{where} is a {LYCORIS_NAMES[kind]} layer without {', '.join(missing)}; the file is damaged "
                        "(re-export it)")
    for k, t in factors.items():
        if not t.is_floating_point():
            raise UserError(f"{where} has {str(t.dtype).replace('torch.', '')} weights; expected floating point "
                            "(fp32/fp16/bf16)")
        dims = (4,) if k in ("hada_t1", "hada_t2", "lokr_t2") else (2, 4) if k == "lokr_w2" else (2,)
        if t.dim() not in dims or 0 in t.shape:
            raise UserError(f"{where} has a {k} of shape {list(t.shape)}; expected a {' or '.join(map(str, dims))}-D "
                            "tensor (LyCORIS' layout); the file is damaged (re-export it)")
    p = Product(kind, factors, None)
    try:
        change = p.delta()
        rank = p.rank
    except (RuntimeError, IndexError, KeyError, ValueError):
        shapes = {k: list(v.shape) for k, v in factors.items()}
        raise UserError(f"{where} has {LYCORIS_NAMES[kind]} factors whose shapes do not multiply {shapes}; the file "
                        "is damaged (re-export it)") from None
    if not torch.isfinite(change).all():
        raise UserError(f"{where} has NaN/Inf weights or a weight change that overflows float32; the file is damaged "
                        "(retrain or re-export it)")
    alphas.check_rank(name, kind, rank)
    alpha, scale = alphas(name, rank), None
    if kind == "lokr" and fmt == "peft" and alpha is not None and alphas.rank(name):
        scale = alpha / alphas.rank(name)  # peft's rule: alpha / its configured r, even with both factors full
    p = fold_scale(Product(kind, factors, alpha), scale)
    if "magnitude" in slot:
        _check_magnitude(source, name, slot["magnitude"], p.out_features, fmt)
        p.magnitude = slot["magnitude"]
    return p


def _kohya_pairs(tensors, source):
    pairs = {}
    for k, t in tensors.items():
        m = re.fullmatch(rf"(lora_unet|lora_te[12]?)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale|{_FACTORS})",
                         k)
        if not m:
            raise UserError(f"{source}: unsupported kohya key {_show(k)}; expected .lora_down.weight, .lora_up.weight, "
                            ".alpha, DoRA's .dora_scale, or LyCORIS's LoHa (.hada_*) / LoKr (.lokr_*) factors")
        if m.group(3) != "alpha":
            which = {"lora_down.weight": "down", "lora_up.weight": "up", "dora_scale": "magnitude"}.get(m.group(3), m.group(3))
            _add(pairs, _kohya_name(m.group(1), m.group(2)), which, t, k, source)
    return pairs


def _kohya_name(prefix: str, body: str) -> str:
    """kohya ('lora_te2', 'text_model_encoder_layers_0_mlp_fc1') -> 'text_encoder_2.text_model.encoder.layers.0.mlp.fc1'.
    SDXL UNet layers in kohya's original-UNet names (input_blocks_…) get diffusers' names (down_blocks.…)."""
    comp, path = _KOHYA_PREFIX[prefix], unmangle(body)
    return f"{comp}.{_swap_prefix(path, _sgm_pairs()) if comp == 'unet' else path}"


def unmangle(name: str) -> str:
    """kohya 'down_blocks_0_attentions_0_proj_in' -> diffusers 'down_blocks.0.attentions.0.proj_in'."""
    s = name.replace("_", ".")
    for word in _COMPOUNDS:
        s = s.replace(word.replace("_", "."), word)
    return s


@lru_cache(maxsize=1)
def _sgm_pairs() -> tuple[tuple[str, str], ...]:
    """(original-UNet prefix, diffusers prefix) for every Linear/Conv2d of SDXL's UNet. kohya's sd-scripts train
    SDXL on the original (SGM) UNet, so its SDXL files name layers `input_blocks.4.1.…` where diffusers says
    `down_blocks.1.attentions.0.…` (sd-scripts' library/sdxl_model_util.make_unet_conversion_map): two
    resnets and attentions then a downsampler per down block, three and an upsampler per up block."""
    resnet = (("in_layers.2.", "conv1."), ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."),
              ("skip_connection.", "conv_shortcut."))
    resnets = [("middle_block.0.", "mid_block.resnets.0."), ("middle_block.2.", "mid_block.resnets.1.")]
    pairs = [("input_blocks.0.0.", "conv_in."), ("out.2.", "conv_out."), ("middle_block.1.", "mid_block.attentions.0."),
             ("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
    for b in range(3):  # SDXL's three levels (the tiny stand-in uses the first two)
        for j in range(2):
            resnets.append((f"input_blocks.{3 * b + j + 1}.0.", f"down_blocks.{b}.resnets.{j}."))
            pairs.append((f"input_blocks.{3 * b + j + 1}.1.", f"down_blocks.{b}.attentions.{j}."))
        pairs.append((f"input_blocks.{3 * b + 3}.0.op.", f"down_blocks.{b}.downsamplers.0.conv."))
        for j in range(3):
            resnets.append((f"output_blocks.{3 * b + j}.0.", f"up_blocks.{b}.resnets.{j}."))
            pairs.append((f"output_blocks.{3 * b + j}.1.", f"up_blocks.{b}.attentions.{j}."))
        pairs.append((f"output_blocks.{3 * b + 2}.2.", f"up_blocks.{b}.upsamplers.0."))
    return tuple(pairs + [(s + rs, d + rd) for s, d in resnets for rs, rd in resnet])


def _swap_prefix(path: str, pairs, reverse: bool = False) -> str:
    """`path` with the first of `pairs`' (old, new) prefixes it starts with replaced by the other (new, old
    if `reverse`); each prefix names whole modules."""
    for old, new in pairs:
        old, new = (new, old) if reverse else (old, new)
        if (path + ".").startswith(old):
            return (new + (path + ".")[len(old):])[:-1]
    return path


_OLD_DIFFUSERS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


def _unprocessor(path: str) -> str:
    """A UNet path in diffusers' attention-processor spelling (`….processor.to_out`, shared_layout's LoHa/LoKr
    names) as the module path."""
    return re.sub(r"\.processor\.to_out$", ".to_out.0", path).replace(".processor.to_", ".to_")


def _diffusers_pairs(tensors, source):
    pairs = {}
    for k, t in tensors.items():
        if k.endswith(".alpha"):
            continue
        if f := re.fullmatch(rf"(unet|text_encoder|text_encoder_2)\.(.+)\.({_FACTORS}|dora_scale)", k):  # LoHa/LoKr
            _add(pairs, canonical(f.group(1), _unprocessor(f.group(2))),
                 "magnitude" if f.group(3) == "dora_scale" else f.group(3), t, k, source)
            continue
        m = re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.(.+?)\.(?:lora_linear_layer\.|lora\.)?"
                         r"(?:(down|up|lora_A|lora_B)(?:\.\w+)?\.weight|(lora_magnitude_vector)(?:\.weight)?)", k)
        if not m:
            raise UserError(f"{source}: unsupported diffusers LoRA key {_show(k)} (bias is not supported); "
                            "expected ….lora.down/up.weight, ….lora_A/lora_B.weight (and DoRA's ….lora_magnitude_vector)")
        path = re.sub(r"processor\.(to_[qkv]_lora|to_out_lora)$", lambda g: _OLD_DIFFUSERS[g.group(1)], m.group(2))
        which = "magnitude" if m.group(4) else "up" if m.group(3) in ("up", "lora_B") else "down"
        _add(pairs, canonical(m.group(1), path), which, t, k, source)
    return pairs


def _peft_pairs(tensors, source):
    pairs = {}
    for k, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(?:lora_([AB])(?:\.\w+)?\.weight|lora_magnitude_vector(?:\.weight)?"
                         rf"|({_FACTORS}))", k)
        if not m:  # detect_format's looser search matched (e.g. nothing before ".lora_A", a trailing newline)
            raise UserError(f"{source}: unsupported peft LoRA key {_show(k)}; expected <module path>.lora_A/lora_B.weight")
        comp = "text_encoder" if m.group(1).startswith(("text_model.", "encoder.layers.")) else "unet"
        which = m.group(3) or ("magnitude" if m.group(2) is None else "up" if m.group(2) == "B" else "down")
        _add(pairs, canonical(comp, m.group(1)), which, t, k, source)
    return pairs


def canonical(comp: str, path: str) -> str:
    """'<comp>.<path>' with the classic CLIP spelling `text_model.…`, which files are written in whatever
    transformers is installed (transformers >= 5 dropped the `text_model` level from the live module tree)."""
    if comp.startswith("text_encoder") and not path.startswith(("text_model.", "text_projection")):
        path = "text_model." + path  # text_projection sits beside text_model (SDXL's second encoder)
    return f"{comp}.{path}"


def _config_path(comp: str, path: str) -> str:
    """A module path for peft configs (target_modules, rank/alpha patterns): without `text_model.`, so
    peft's suffix match finds the layer under either transformers spelling."""
    return path.removeprefix("text_model.") if comp.startswith("text_encoder") else path


def _alphas(fmt, tensors, metadata, peft_config, source="<memory>"):
    """Return alpha(name, rank): each format's own rule, and alpha = rank (scale 1) when it has none."""
    import torch

    table = {}  # alpha tensors: kohya's, and the LoHa/LoKr layers' of sdlora's diffusers-layout files
    for k, t in tensors.items():
        m = re.fullmatch(r"(lora_unet|lora_te[12]?)_(.+)\.alpha" if fmt == "kohya" else
                         r"(unet|text_encoder|text_encoder_2)\.(.+)\.alpha", k)
        if m:
            if t.numel() != 1 or t.dtype == torch.bool or t.is_complex():
                raise UserError(f"{source}: alpha {_show(k)} has shape {list(t.shape)} and dtype "
                                f"{str(t.dtype).replace('torch.', '')}; expected one number")
            name = _kohya_name(*m.groups()) if fmt == "kohya" else canonical(m.group(1), _unprocessor(m.group(2)))
            table[name] = _positive(t.float().item(), f"alpha {_show(k)}", source)
    if fmt == "kohya":  # kohya's loaders read alpha from the tensors and r from their shapes: no config to check
        def kohya(name, r):
            return table.get(name, None if r is None else float(r))
        kohya.rank = kohya.check_rank = lambda *a: None
        return kohya
    configs, what = {}, "lora_adapter_metadata header"
    if fmt == "diffusers" and metadata.get("lora_adapter_metadata"):
        packed = _json(metadata["lora_adapter_metadata"], what, source)
        if not isinstance(packed, dict):
            raise UserError(f"{source}: its {what} is not a JSON object; the file is damaged (re-export it)")
        for key, value in packed.items():
            comp, _, field_ = key.partition(".")
            configs.setdefault(comp, {})[field_] = value
    elif fmt == "peft":
        what = "adapter_config.json" if peft_config is not None else "adapter_config header"
        cfg = peft_config
        if cfg is None and metadata.get("adapter_config"):
            cfg = _json(metadata["adapter_config"], what, source)
        if cfg is not None:
            configs = {"unet": cfg, "text_encoder": cfg}
    for comp, cfg in configs.items():
        _check_config(cfg, f"{what}" + (f" ({comp})" if fmt == "diffusers" else ""), source)

    def alpha(name, r):
        comp, path = name.split(".", 1)
        cfg = configs.get(comp)
        key = "alpha" if cfg and str(cfg.get("peft_type")).upper() in ("LOHA", "LOKR") else "lora_alpha"
        if name in table:
            return table[name]
        if not cfg or key not in cfg:
            return None if r is None else float(r)
        value = float(cfg[key] if (value := _pattern(cfg.get("alpha_pattern"), path)) is None else value)
        if cfg.get("use_rslora") and key == "lora_alpha" and r:  # peft scales by alpha/sqrt(r): the same as alpha' / r
            return value * math.sqrt(r)
        return value

    def rank(name):
        """The configured r (peft's LoKr divides alpha by it even when both factors are full)."""
        comp, path = name.split(".", 1)
        cfg = configs.get(comp) or {}
        value = _pattern(cfg.get("rank_pattern"), path)
        return cfg.get("r") if value is None else value

    def check_rank(name, kind, r):
        """A config whose r (or rank_pattern) contradicts a LoRA/LoHa layer's weights is refused: alpha / r would
        differ by the factor between them (peft, and so diffusers' loader, refuse such a file: its layers are
        built at the configured r, and the weights do not fit them). LoKr's r is no rank of its factors."""
        cfg = configs.get(name.split(".", 1)[0])
        if kind == "lokr" or not cfg or str(cfg.get("peft_type") or "LORA").upper() != kind.upper():
            return
        want = rank(name)
        if want is not None and float(want) != r:
            raise UserError(f"{source}: its {what} says r={want:g} for layer "
                            f"{_show(name)}, but its weights have rank {r}; the strength alpha/r is ambiguous, so "
                            "the file is refused (re-export it, or fix r / rank_pattern in its config)")
    alpha.rank, alpha.check_rank = rank, check_rank
    return alpha


def _check_config(cfg, what, source):
    """The peft config fields sdlora reads: numbers > 0 and pattern tables of valid regexes."""
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: its {what} is not a JSON object; the file is damaged (re-export it)")
    for key in ("lora_alpha", "alpha", "r"):
        if key in cfg:
            _positive(cfg[key], f"{key} in its {what}", source)
    for key in ("alpha_pattern", "rank_pattern"):
        table = cfg.get(key) or {}
        if not isinstance(table, dict):
            raise UserError(f"{source}: {key} in its {what} is not a JSON object; the file is damaged (re-export it)")
        for pattern, value in table.items():
            _positive(value, f"{key}[{_show(pattern)}] in its {what}", source)
            try:
                re.compile(rf"(.*\.)?({pattern})$")  # as _pattern uses it
            except (re.error, TypeError):
                raise UserError(f"{source}: {key} in its {what} has an invalid pattern {_show(pattern)}; "
                                "expected module names") from None


def _pattern(patterns, path):
    """peft's rank/alpha_pattern lookup: a key matches a module path it ends with."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path) or re.match(rf"(.*\.)?({key})$", path.removeprefix("text_model.")):
            return value
    return None


# ---------------------------------------------------------------- writing

def save_lora(lora: Lora, out, fmt: str, dtype: str | None = None) -> Path:
    """Write `lora` in `fmt` to OUT (a .safetensors file, or a folder); atomic; returns the weights file."""
    from ..io import save_safetensors
    from ..models import torch_dtype

    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    cast = torch_dtype(dtype) if dtype else None
    meta = {k: v for k, v in lora.metadata.items() if k not in ("lora_adapter_metadata", "adapter_config")}
    meta["format"] = "pt"
    if lora.base_model and not _metadata_base_model(meta):
        meta["sdlora_base_model"] = lora.base_model
    if fmt == "peft":
        return _save_peft(lora, out, meta, cast)
    file = out if out.suffix == ".safetensors" else out / ("lora.safetensors" if fmt == "kohya" else WEIGHTS_NAME)
    tensors, extra = (_to_kohya if fmt == "kohya" else diffusers_tensors)(lora)
    if fmt == "diffusers":  # the spelling ComfyUI reads too, scale folded into the weights (shared_layout)
        from .shared_layout import to_shared
        tensors, extra = to_shared(tensors, {**meta, **extra}, str(file))
    save_safetensors(_cast(tensors, cast), file, {**meta, **extra})
    if lora.base_model and out.suffix != ".safetensors" and not (out / "README.md").exists():
        write_minimal(out, lora.base_model)
    return file


def output_files(out, fmt: str) -> list[Path]:
    """The files `save_lora(…, out, fmt)` may write (a peft folder: each text encoder's part in its subfolder too;
    a model card is only ever added where none exists)."""
    out = Path(out)
    if out.suffix == ".safetensors":
        return [out]
    if fmt != "peft":
        return [out / ("lora.safetensors" if fmt == "kohya" else WEIGHTS_NAME)]
    return [d / n for d in (out, *(out / c for c in TEXT_ENCODERS)) for n in (WEIGHT_NAMES[1], "adapter_config.json")]


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


def _cast(tensors, dtype):
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and v.dim() else v) for k, v in tensors.items()}


def _to_kohya(lora):
    import torch

    # One alpha for the whole file (the most common): diffusers' kohya loader ignores per-layer alphas of
    # attention layers, so other layers' scale is folded into `up` instead. The product is unchanged.
    common = _common_alpha(lora)
    xl = _lora_family(lora)[0] == "sdxl"  # kohya names SDXL's first text encoder lora_te1_, with or without the second
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    unet = _kohya_unet_paths(lora, xl)
    out = {}
    for name, m in lora.modules.items():
        comp, path = name.split(".", 1)
        key = prefix[comp] + (unet[path] if comp == "unet" else path).replace(".", "_")
        if m.kind != "lora":  # LyCORIS's own keys; LoKr at scale 1 (fold_scale), which alpha = its rank says
            out.update({f"{key}.{k}": v for k, v in m.factors.items()})
            out[key + ".alpha"] = torch.tensor(_kohya_alpha(m, common))
            if m.magnitude is not None:
                out[key + ".dora_scale"] = m.magnitude
            continue
        out[key + ".lora_down.weight"] = m.down
        out[key + ".lora_up.weight"] = m.up if m.alpha == common else (m.up.float() * (m.alpha / common)).to(m.up.dtype)
        out[key + ".alpha"] = torch.tensor(float(common))
        if m.magnitude is not None:  # LyCORIS >= 3.2's output-axis layout, which ComfyUI/Forge tell from its shape
            out[key + ".dora_scale"] = m.magnitude.reshape(-1, *[1] * (m.down.dim() - 1))
    padded = _pad_text_encoder(lora, out, prefix, common)
    extra = network_header(lora)
    kinds = {m.kind for m in lora.modules.values()} - {"lora"}
    if kinds:  # what LyCORIS's and kohya's tools read to rebuild the network
        extra |= {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": kinds.pop()})}
    if padded:
        extra[_PADDING_KEY] = json.dumps(padded)
    return out, extra


_PADDING_KEY = "sdlora_zero_modules"


def _common_alpha(lora) -> float:
    plain = [m for m in lora.modules.values() if m.kind == "lora"]
    return collections.Counter(m.alpha for m in plain).most_common(1)[0][0] if plain else 1.0


def _kohya_alpha(m, common: float) -> float:
    """A layer's alpha tensor in kohya's layout: the file's common alpha (a plain layer's own scale is folded into
    up), LoHa's own, and a LoKr layer's rank: it is kept at scale 1 (fold_scale), 1 where it has no rank."""
    return float(common if m.kind == "lora" else m.alpha if m.kind == "loha" else m.rank or 1)


def network_header(lora) -> dict[str, str]:
    """kohya's ss_network_dim / ss_network_alpha, describing the tensors kohya's layout holds: the most common rank
    and the most common alpha tensor (a LoKr file's alpha is its rank, its scale being folded into lokr_w1)."""
    ranks = collections.Counter(m.rank for m in lora.modules.values() if m.rank)
    common = _common_alpha(lora)
    alphas = collections.Counter(_kohya_alpha(m, common) for m in lora.modules.values())
    return {"ss_network_dim": str(ranks.most_common(1)[0][0] if ranks else 1),
            "ss_network_alpha": f"{alphas.most_common(1)[0][0]:g}"}


def _kohya_unet_paths(lora, xl: bool) -> dict[str, str]:
    """{diffusers path: the path kohya names it by} for the UNet layers: an SDXL LoRA's in the original-UNet names
    kohya's sd-scripts use, when every layer has one (diffusers' loader drops the original names from a file that
    mixes both spellings); other families' (and any other SDXL file's) unchanged."""
    paths = [n.split(".", 1)[1] for n in lora.modules if n.startswith("unet.")]
    if xl:
        sgm = {p: _swap_prefix(p, _sgm_pairs(), reverse=True) for p in paths}
        if all(sgm[p] != p for p in paths):
            return sgm
    return {p: p for p in paths}


def _pad_text_encoder(lora, out, prefix, alpha) -> list[str]:
    """diffusers (<= 0.42) recognises a kohya text-encoder LoRA only by an `out_proj` key and raises
    "Could not automatically infer state dict type" otherwise (e.g. q/v-only or mlp-only files). Add one
    all-zero rank-1 out_proj pair per such encoder: its weight change is exactly 0, every loader accepts it,
    and the names go in the header so sdlora drops them again on reading."""
    import torch

    padded = []
    for comp in ("text_encoder", "text_encoder_2"):
        mods = {n.split(".", 1)[1]: m for n, m in lora.modules.items() if n.startswith(comp + ".")}
        if not mods or any(p.endswith("self_attn.out_proj") for p in mods):
            continue
        path, m = next(iter(mods.items()))
        hidden = m.out_features if path.endswith("fc2") else m.in_features
        layer = re.search(r"layers\.(\d+)\.", path)
        name = f"text_model.encoder.layers.{layer.group(1) if layer else 0}.self_attn.out_proj"
        key = prefix[comp] + name.replace(".", "_")
        out[key + ".lora_down.weight"] = torch.zeros(1, hidden, dtype=m.down.dtype)
        out[key + ".lora_up.weight"] = torch.zeros(hidden, 1, dtype=m.up.dtype)
        out[key + ".alpha"] = torch.tensor(float(alpha))
        padded.append(f"{comp}.{name}")
    return padded


def diffusers_tensors(lora):
    """`lora` in diffusers' key layout, and its header entries (`lora_adapter_metadata`)."""
    tensors, packed = {}, {}
    for comp in lora.components():
        mods = {n.split(".", 1)[1]: m for n, m in lora.modules.items() if n.startswith(comp + ".")}
        down, up = diffusers_keys(comp)
        for p, m in mods.items():
            if m.kind != "lora":  # LyCORIS's factor names under diffusers' prefixes, with each layer's alpha
                tensors.update({f"{comp}.{p}.{k}": v for k, v in m.factors.items()})
                if m.alpha is not None:
                    tensors[f"{comp}.{p}.alpha"] = _alpha_tensor(m.alpha)
                if m.magnitude is not None:
                    tensors[f"{comp}.{p}.dora_scale"] = m.magnitude
                continue
            tensors[f"{comp}.{p}.{down}.weight"] = m.down
            tensors[f"{comp}.{p}.{up}.weight"] = m.up
            if m.magnitude is not None:
                tensors[f"{comp}.{p}.{magnitude_key(comp)}"] = peft_magnitude(m)
        plain = {_config_path(comp, p): m for p, m in mods.items() if m.kind == "lora"}
        if plain:
            packed.update({f"{comp}.{k}": v for k, v in peft_config_dict(plain).items()})
    return tensors, {"lora_adapter_metadata": json.dumps(packed, sort_keys=True)} if packed else {}


def _alpha_tensor(alpha: float):
    import torch

    return torch.tensor(float(alpha))


def magnitude_key(comp: str) -> str:
    """The DoRA magnitude's key name diffusers' `load_lora_weights` reads: the UNet's as peft saves it, the text
    encoders' with `.weight` (transformers' adapter loader reports the bare name as unexpected and keeps its
    initial magnitude)."""
    return "lora_magnitude_vector" if comp == "unet" else "lora_magnitude_vector.weight"


def peft_magnitude(m: Module) -> "torch.Tensor":
    """A DoRA magnitude in peft's shape: [out] (Linear), [1, out, 1, 1] (Conv2d)."""
    return m.magnitude.reshape(1, -1, 1, 1) if m.down.dim() == 4 else m.magnitude


def diffusers_keys(comp: str) -> tuple[str, str]:
    """The down/up key names diffusers' `load_lora_weights` reads for a component: peft's lora_A/lora_B for the
    UNet, its own lora_linear_layer.down/up for text encoders (its text-encoder path cannot infer the type of
    lora_A/lora_B keys when no attention projection is among them, e.g. mlp-only LoRAs)."""
    return ("lora_A", "lora_B") if comp == "unet" else ("lora_linear_layer.down", "lora_linear_layer.up")


def peft_config_dict(mods: dict[str, Module]) -> dict:
    """peft LoraConfig kwargs that reproduce each module's rank and alpha exactly."""
    r = collections.Counter(m.rank for m in mods.values()).most_common(1)[0][0]
    alpha = collections.Counter(m.alpha for m in mods.values()).most_common(1)[0][0]
    return {
        "r": r, "lora_alpha": alpha, "target_modules": sorted(mods), "init_lora_weights": True,
        "rank_pattern": {p: m.rank for p, m in mods.items() if m.rank != r},
        "alpha_pattern": {p: m.alpha for p, m in mods.items() if m.alpha != alpha},
        "peft_type": "LORA", "bias": "none", "lora_dropout": 0.0,
        "use_dora": any(m.magnitude is not None for m in mods.values()),
    }


def lycoris_config_dict(mods: dict, source) -> dict:
    """peft LoHaConfig / LoKrConfig kwargs under which peft builds these layers' factors and applies their change:
    LoHa's rank and alpha per layer; LoKr's at scale 1 (fold_scale), with an r that gives each factor its form."""
    from peft.tuners.lokr.layer import factorization

    kinds = {m.kind for m in mods.values()}
    if len(kinds) > 1:
        raise UserError(f"{source}: peft holds one adapter type per model; this LoRA mixes "
                        f"{', '.join(sorted(LYCORIS_NAMES.get(k, 'LoRA') for k in kinds))} — save it as kohya or diffusers")
    kind = kinds.pop()
    if any(m.magnitude is not None for m in mods.values()):
        raise UserError(f"{source}: peft has no DoRA for {LYCORIS_NAMES[kind]} layers; save it as kohya or diffusers")
    if kind == "loha":
        ranks = {p: m.rank for p, m in mods.items()}
        alphas = {p: m.alpha if m.alpha is not None else m.rank for p, m in mods.items()}
        extra = {"use_effective_conv2d": any("hada_t1" in m.factors for m in mods.values())}
    else:
        ranks = {}
        for p, m in mods.items():
            # (a conv layer's w1 splits its input channels, which the flattened factors do not tell apart from
            # the kernel: only the output side is checked there)
            f, a, c = m.factors, m._side("lokr_w1", 0), m._side("lokr_w1", 1)
            if "lokr_t2" in f or a != factorization(m.out_features)[0] or m.in_features % c:
                raise UserError(f"{source}: layer {_show(p)} is a LoKr layer whose factor shapes peft does not build "
                                "(a factor other than -1, or Tucker); save it as kohya or diffusers")
            # peft keeps w2 full when r >= max(w2's sides) / 2: a full w2 gets that r, a low-rank one its own
            ranks[p] = m.rank or max(m._side("lokr_w2", 0), m._side("lokr_w2", 1))
        alphas = ranks
        extra = {"decompose_both": any("lokr_w1_a" in m.factors for m in mods.values()), "decompose_factor": -1}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {"peft_type": kind.upper(), "r": r, "alpha": alpha, "target_modules": sorted(mods),
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
            "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True, **extra}


def _save_peft(lora, out: Path, meta, cast) -> Path:
    from ..io import save_safetensors, write_text

    comps = sorted(lora.components(), key=lambda c: c != "unet")  # the UNet at the root, others in subfolders
    if out.suffix == ".safetensors" and len(comps) > 1:
        raise UserError(f"{out}: peft holds one model per file; this LoRA has {', '.join(comps)} — give a folder instead")
    first = None
    for comp in comps:
        mods = {n.split(".", 1)[1]: m for n, m in lora.modules.items() if n.startswith(comp + ".")}
        paths = {_config_path(comp, p): m for p, m in mods.items()}
        plain = all(m.kind == "lora" for m in mods.values())
        cfg = peft_config_dict(paths) if plain else lycoris_config_dict(paths, lora.source)
        tensors = {}
        for p, m in mods.items():
            if not plain:
                tensors.update({f"base_model.model.{p}.{k}": v for k, v in m.factors.items()})
                continue
            tensors[f"base_model.model.{p}.lora_A.weight"] = m.down
            tensors[f"base_model.model.{p}.lora_B.weight"] = m.up
            if m.magnitude is not None:
                tensors[f"base_model.model.{p}.lora_magnitude_vector"] = peft_magnitude(m)
        folder = out if comp == comps[0] else out / comp
        file = out if out.suffix == ".safetensors" else folder / WEIGHT_NAMES[1]
        save_safetensors(_cast(tensors, cast), file, {**meta, "adapter_config": json.dumps(cfg)})
        if out.suffix != ".safetensors":
            write_text(folder / "adapter_config.json", json.dumps(cfg, indent=2))
        first = first or file
    return first


@lru_cache(maxsize=None)
def _clip_has_text_model(cls_name: str) -> bool:
    import transformers

    tiny = transformers.CLIPTextConfig(hidden_size=8, intermediate_size=8, num_attention_heads=1, num_hidden_layers=1,
                                       vocab_size=8, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=8)
    return hasattr(getattr(transformers, cls_name)(tiny), "text_model")


def live_path(comp: str, path: str) -> str:
    """The module path in the installed library: transformers>=5's CLIPTextModel has no `text_model` level
    (its CLIPTextModelWithProjection, SDXL's text_encoder_2, keeps it)."""
    if comp in TEXT_CLASSES and path.startswith("text_model.") and not _clip_has_text_model(TEXT_CLASSES[comp]):
        return path[len("text_model."):]
    return path


# ---------------------------------------------------------------- description

# The cross-attention width of each family's real checkpoints: CLIP ViT-L, OpenCLIP ViT-H, and SDXL's two
# encoders side by side. Any other width (tiny test models) is named in messages.


def unet_family(unet_config, pipeline_class: str | None = None) -> str:
    """How messages and `inspect` name a base's family (models.family_of, models.FAMILIES): "SD 1.x", "SDXL", and
    "SD 1.x (cross-attention dim 32)" for widths no real checkpoint of the family has."""
    from ..models import family_of

    return _family_name(family_of(unet_config, pipeline_class), unet_config.get("cross_attention_dim"))


def family(lora: Lora) -> str:
    """The family a LoRA was made for, named as `unet_family` names bases; "unknown" when nothing tells."""
    key, dim = _lora_family(lora)
    return _family_name(key, dim) if key else "unknown"


def _family_name(key: str, dim: int | None) -> str:
    from ..models import FAMILIES, WIDTHS

    return FAMILIES[key] if dim in (None, WIDTHS[key]) else f"{FAMILIES[key]} (cross-attention dim {dim})"


def _lora_family(lora: Lora) -> tuple[str | None, int | None]:
    """(models.family_of key or None, cross-attention width or None) of the base a LoRA was made for: from its
    UNet layers, else its text-encoder width, else kohya's ss_base_model_version header."""
    from ..models import FAMILY_BY_WIDTH, family_of

    config = _unet_config(lora)
    if config:
        return family_of(config), config["cross_attention_dim"]
    key = FAMILY_BY_WIDTH.get(_in_width(lora, r"text_encoder\..*(q_proj|k_proj|v_proj|fc1)"))
    return key or _metadata_family(lora.metadata), None


# Layers only SDXL has: a second text encoder, the UNet's added-conditioning MLP, transformer depth > 1, and
# original-UNet names.
_XL_LAYERS = (r"(text_encoder_2\.|unet\.(add_embedding\.|.*\.transformer_blocks\.[1-9]"
              r"|(input_blocks|output_blocks|middle_block)\.))")


def _unet_config(lora: Lora) -> dict:
    """What a LoRA's layers tell of the UNet config it was made for, as models.family_of reads one; {} if nothing."""
    from ..models import WIDTHS

    dim = _in_width(lora, r"unet\..*\.attn2\.to_[kv]")
    xl = (dim == WIDTHS["sdxl"] or _metadata_family(lora.metadata) == "sdxl"
          or any(re.match(_XL_LAYERS, n) for n in lora.modules))
    if dim is None and not xl:
        return {}
    linear = any(re.match(r"unet\..*\.proj_(in|out)$", n) and (m.kind != "lora" or m.down.dim() == 2)
                 for n, m in lora.modules.items())
    return {"cross_attention_dim": dim, "use_linear_projection": linear,
            "addition_embed_type": "text_time" if xl else None}


def _in_width(lora: Lora, pattern: str) -> int | None:
    """The input width of the first layer whose name matches `pattern`, or None."""
    return next((m.in_features for n, m in lora.modules.items() if re.match(pattern + "$", n)), None)


def _metadata_family(metadata: dict) -> str | None:
    """kohya's ss_base_model_version (sd_v1, sd_v2, sd_v2_v, sdxl_base_v1-0) as a family key."""
    version = str(metadata.get("ss_base_model_version") or "")
    return next((k for p, k in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")) if version.startswith(p)), None)


def with_modules(lora: Lora, modules: dict[str, Module], **changes) -> Lora:
    return replace(lora, modules=modules, **changes)
