"""Which layers of a LoRA file each known loader applies, and at what scale — from the loaders' published key
conventions (their source, read as noted below), not by running them.

A loader finds a layer by a name its key map gives the model's layer, then a weight suffix it knows after that
name; it scales the change by alpha / rank when it finds `<name>.alpha`, else by its default. What each one reads:

* ComfyUI (comfy/lora.py `model_lora_keys_unet` / `model_lora_keys_clip`, comfy/utils.py `unet_to_diffusers`,
  comfy/weight_adapter/lora.py, loha.py, lokr.py): UNet layers as ``lora_unet_<diffusers path, "_" for ".">``,
  ``lora_unet_<original (LDM) path>``, ``unet.<diffusers path>`` with ``.to_`` spelled ``.processor.to_`` and
  ``to_out.0`` as ``to_out``; CLIP layers (q/k/v/out_proj, fc1, fc2) as ``lora_te_`` / ``lora_te1_`` /
  ``text_encoder.text_model.…`` and, on SDXL, ``lora_te2_`` / ``text_encoder_2.…``. Weights: ``.lora_up/down``,
  ``_lora.up/down``, ``.lora_B/A``, ``.lora.up/down``, ``.lora_linear_layer.up/down``, LyCORIS' ``hada_*`` /
  ``lokr_*``; ``<name>.alpha`` (absent: scale 1.0); DoRA from ``<name>.dora_scale`` only. Every key it does not
  read is logged as ``lora key not loaded: <key>``.
* Forge (backend/patcher/lora.py imports packages_3rdparty/comfyui_lora_collection): ComfyUI's key maps and rules.
* A1111 (extensions-builtin/Lora/networks.py, network.py, network_lora.py): a key is split at its first "." and
  the name converted by `convert_diffusers_name_to_compvis` — kohya names only (``lora_unet_`` diffusers-style or
  original paths, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``); ``lora_up/down.weight``, ``hada_*``, ``lokr_*``;
  ``alpha`` / rank, else 1.0. OpenCLIP attention (SD 2.x, SDXL's second encoder) is one MultiheadAttention: its
  q/k/v/out LoRA applies only when all four are in the file. ``dora_scale`` is read per input channel (LyCORIS <
  3.2). Unmatched keys: ``Failed to match keys when loading network …`` on the console.
* kohya's sd-scripts (networks/lora.py `create_network_from_weights`): modules inside Transformer2DModel,
  ResnetBlock2D, Downsample2D, Upsample2D and CLIP attention/MLP, named ``lora_unet_<path>`` by diffusers paths
  for SD 1.x/2.x and by original (LDM) paths for SDXL, ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` on SDXL);
  ``lora_up/down.weight`` only (LoHa, LoKr and DoRA need LyCORIS's network module); alpha absent = rank.
* SD3 (comfy/lora.py's SD3 branch and its generic ``lora_unet_<original path>``; kohya's networks/lora_sd3.py):
  ComfyUI/Forge know an MMDiT layer as ``transformer.<diffusers path>``, ``lora_transformer_…``, ``lycoris_…``
  and ``lora_unet_<original path>`` (q/k/v fused: formats.mmdit), kohya only the last; its CLIPs as on SDXL.
* diffusers 0.42 (`load_lora_weights`: lora_pipeline.lora_state_dict, lora_conversion_utils
  `_convert_non_diffusers_lora_to_diffusers`, state_dict_utils, peft_utils.get_peft_kwargs): see `_diffusers`.
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

from ..models import TEXT_CLASSES
from . import formats
from .lycoris import KEYS as LYCORIS_KEYS

_CLIP = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
_BLOCK = r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)"
# The diffusers UNet paths ComfyUI's unet_to_diffusers maps (its Linear/Conv2d weights).
_COMFY_UNET = re.compile(
    rf"{_BLOCK}\.resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)"
    rf"|{_BLOCK}\.attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    r"|ff\.net\.0\.proj|ff\.net\.2))"
    r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv"
    r"|conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12]|class_embedding\.linear_[12]")
# The diffusers-style kohya names A1111's convert_diffusers_name_to_compvis converts.
_A1111_UNET = re.compile(rf"conv_in|conv_out|time_embedding\.linear_\d+|{_BLOCK}\.(attentions|resnets)\.\d+\..+"
                         r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv")
# The modules kohya's LoRANetwork wraps: inside Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D.
_KOHYA_UNET = re.compile(rf"{_BLOCK}\.(attentions\.\d+\..+|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj))"
                         r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv")
_LORA_PAIRS = {  # (down suffix, up suffix) each loader reads after a layer's name
    "comfyui": ((".lora_down.weight", ".lora_up.weight"), ("_lora.down.weight", "_lora.up.weight"),
                (".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"), (".lora_A", ".lora_B"),
                (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
                (".lora_A.default.weight", ".lora_B.default.weight")),
    "forge": ((".lora_down.weight", ".lora_up.weight"), ("_lora.down.weight", "_lora.up.weight"),
              (".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
              (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")),
    "a1111": ((".lora_down.weight", ".lora_up.weight"),),
    "kohya": ((".lora_down.weight", ".lora_up.weight"),),
}


@dataclass(frozen=True)
class Loader:
    name: str
    key: str  # its entry in _LORA_PAIRS and _names
    lycoris: bool  # reads LyCORIS' LoHa/LoKr factors
    dora: str  # "output": reads dora_scale per output channel (sdlora's, LyCORIS >= 3.2); "input"; "": ignores it
    unread: str  # what it does with keys it does not read


LOADERS = (
    Loader("ComfyUI", "comfyui", True, "output", 'logs "lora key not loaded: <key>" for each'),
    Loader("Forge", "forge", True, "output", "ComfyUI's loader: skips them"),
    Loader("A1111", "a1111", True, "input", 'prints "Failed to match keys when loading network"'),
    Loader("kohya", "kohya", False, "", "load_state_dict(strict=False): ignores them"),
)


@dataclass
class Reading:
    """What one loader does with a file: `applied` of `total` layers; `scales` it applies; `rescaled` layers at
    another scale than the file's; `no_magnitude` DoRA layers applied without (or with a misread) magnitude."""
    loader: str
    total: int
    applied: int = 0
    scales: list = field(default_factory=list)
    rescaled: int = 0
    no_magnitude: int = 0
    alpha_read: bool = False
    error: str | None = None

    @property
    def exact(self) -> bool:
        return self.error is None and self.applied == self.total and not self.rescaled and not self.no_magnitude


def read_by_loaders(tensors: dict, header: dict, lora: formats.Lora) -> list[Reading]:
    """Each known loader's reading of a file's `tensors` (raw keys) and `header`; `lora` is sdlora's reading of it
    (the layers, and the scale each was made for)."""
    fam = formats.lora_family(lora)[0] or "sd1"
    return [_diffusers(tensors, header, lora, fam)] + [_by_names(ld, tensors, lora, fam) for ld in LOADERS]


def _names(loader: str, comp: str, path: str, fam: str) -> list[str]:
    """The names `loader`'s key map gives the layer `comp`.`path` of a `fam` model ([] when it has none)."""
    under = path.replace(".", "_")
    ldm = formats.swap_prefix(path, formats.sgm_pairs(), reverse=True) if fam == "sdxl" else path
    ldm = ldm.replace(".", "_") if ldm != path else None  # original-UNet names: known for SDXL only
    if comp == "unet":
        if loader in ("comfyui", "forge"):
            stem = formats.unet_stem(path)
            out = [f"lora_unet_{under}", f"unet.{stem}", stem, f"lycoris_{under}"] if _COMFY_UNET.fullmatch(path) else []
            return out + ([f"lora_unet_{ldm}"] if ldm else [])
        if loader == "a1111":  # its SD 1.x block arithmetic puts SDXL's first upsampler in the wrong block
            ok = _A1111_UNET.fullmatch(path) and not (fam == "sdxl" and path.startswith("up_blocks.0.upsamplers"))
            return ([f"lora_unet_{under}"] if ok else []) + ([f"lora_unet_{ldm}"] if ldm else [])
        if not _KOHYA_UNET.fullmatch(path):
            return []
        return ([f"lora_unet_{ldm}"] if ldm else []) if fam == "sdxl" else [f"lora_unet_{under}"]
    if comp == "transformer":  # SD3's MMDiT (formats.mmdit): diffusers' names, and the original ones kohya writes
        sai = formats.sai_name(path)[0]
        kohya = [f"lora_unet_{sai.replace('.', '_')}"] if sai else []
        if loader in ("comfyui", "forge"):  # comfy/lora.py: mmdit_to_diffusers' layers, and every original weight
            named = [f"transformer.{path}", f"base_model.model.{path}", f"lora_transformer_{under}", f"lycoris_{under}"]
            return (named if sai else []) + kohya
        return kohya if loader == "kohya" else []  # A1111's Lora extension maps no MMDiT layer
    if comp == "text_encoder_2" and path == "text_projection":
        return ["lora_te2_text_projection"] if loader == "comfyui" and fam == "sdxl" else []
    if not _CLIP.fullmatch(path) or (comp == "text_encoder_2" and fam not in ("sdxl", "sd3")):
        return []
    te = comp == "text_encoder_2"
    if loader in ("comfyui", "forge"):
        kohya = ["lora_te2_"] if te else ["lora_te_", "lora_te1_"]
        return [p + under for p in kohya] + [f"{comp}.{path}"]
    if loader == "a1111":
        kohya = ["lora_te2_"] if te else {"sd1": ["lora_te_", "lora_te1_"], "sd2": ["lora_te_"]}.get(fam, ["lora_te1_"])
    else:
        kohya = ["lora_te2_"] if te else ["lora_te1_"] if fam in ("sdxl", "sd3") else ["lora_te_"]
    return [p + under for p in kohya]


def _by_names(loader: Loader, tensors: dict, lora, fam: str) -> Reading:
    r = Reading(loader.name, len(lora.modules))
    applied = {}
    for name, m in lora.modules.items():
        comp, path = name.split(".", 1)
        for stem in _names(loader.key, comp, path, fam):
            found = _weights(loader, stem, tensors)
            if found is not None:
                applied[name] = (stem, found)
                break
    if loader.key == "a1111":  # OpenCLIP attention: one MultiheadAttention, patched only with all of q, k, v, out
        for name, (stem, _) in list(applied.items()):
            comp, path = name.split(".", 1)
            if re.search(r"self_attn_(q|k|v|out)_proj$", stem) and (fam == "sd2" or comp == "text_encoder_2"):
                quad = [re.sub(r"(q|k|v|out)_proj$", f"{p}_proj", stem) for p in ("q", "k", "v", "out")]
                if not all(_weights(loader, q, tensors) is not None for q in quad):
                    applied.pop(name)
    for name, (stem, rank) in applied.items():
        m = lora.modules[name]
        alpha = tensors.get(stem + ".alpha")
        scale = float(alpha) / rank if alpha is not None and rank else 1.0
        r.alpha_read |= alpha is not None
        _count(r, scale, _file_scale(m, tensors, stem))
        dora_ok = loader.dora == "output" and stem + ".dora_scale" in tensors
        r.no_magnitude += m.magnitude is not None and not dora_ok
    return r


def _weights(loader: Loader, stem: str, tensors: dict) -> int | None:
    """When `loader` finds a layer's weights under `stem`: the rank it divides alpha by (0: none, scale 1 — a LoKr
    layer with both factors full). None when it finds none."""
    for down, up in _LORA_PAIRS[loader.key]:
        if stem + down in tensors and stem + up in tensors:
            return tensors[stem + down].shape[0]
    if loader.lycoris:
        factors = {k: tensors[f"{stem}.{k}"] for keys in LYCORIS_KEYS.values() for k in keys if f"{stem}.{k}" in tensors}
        if "hada_w1_a" in factors and "hada_w1_b" in factors:
            return factors["hada_w1_b"].shape[0]
        if {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"} & set(factors):
            for k in ("lokr_w2_b", "lokr_w1_b"):  # the low-rank factor's rank; both full: no rank (scale 1)
                if k in factors:
                    return factors[k].shape[0]
            return 0
    return None


def _file_scale(m, tensors, stem) -> float:
    """The scale the file was made for: sdlora's reading (alpha / rank; LoHa/LoKr by LyCORIS' rule on its raw
    factors, which sdlora reads into an equivalent form)."""
    if m.kind == "lora":
        return m.alpha / m.rank
    alpha = tensors.get(stem + ".alpha")
    rank = _weights(Loader("", "comfyui", True, "", ""), stem, tensors)
    return float(alpha) / rank if alpha is not None and rank else 1.0


def _count(r: Reading, scale: float, want: float):
    r.applied += 1
    if not any(abs(scale - s) <= 1e-6 * max(1.0, abs(s)) for s in r.scales):
        r.scales.append(scale)
    r.rescaled += abs(scale - want) > 1e-6 * max(1.0, abs(want))


# ---------------------------------------------------------------- diffusers

_KOHYA_KEY = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")


def _diffusers(tensors: dict, header: dict, lora, fam: str) -> Reading:
    """diffusers 0.42's `load_lora_weights` on an SD 1.x/2.x/SDXL pipeline. kohya keys (every key lora_unet_ /
    lora_te*_) are converted (_convert_non_diffusers_lora_to_diffusers): ``dora_scale`` dropped with a warning,
    only lora_down/up/alpha understood, SDXL's original names mapped unless mixed with diffusers' (then dropped);
    alphas go to peft as one lora_alpha per model (the most common) plus a pattern that only matches UNet layers
    outside attention. Other files must have "lora" in every key; the UNet's are converted from diffusers'
    older names unless the first one is peft's (lora_A); alpha comes from the lora_adapter_metadata header."""
    r = Reading("diffusers", len(lora.modules))
    keys = [k for k in tensors if "dora_scale" not in k]
    if keys and all(k.startswith(_KOHYA_KEY) for k in tensors):  # its SD3 loader converts no kohya key: none load
        return r if fam == "sd3" else _diffusers_kohya(r, tensors, header, lora, fam)
    if not all("lora" in k for k in keys):
        r.error = "Invalid LoRA checkpoint (a key without 'lora', e.g. LoHa/LoKr factors or .alpha tensors)"
        return r
    unet = [k for k in keys if k.startswith("unet.")]
    peft_first = bool(unet) and "lora_A" in unet[0]
    for name, m in lora.modules.items():
        comp, path = name.split(".", 1)
        if comp == "text_encoder_2" and fam not in ("sdxl", "sd3"):
            continue
        if comp in ("unet", "transformer"):
            forms = [(f"{comp}.{path}", ".lora_A.weight")]
            if not peft_first and comp == "unet":
                stem = formats.unet_stem(path)
                forms += [(f"unet.{path}", ".lora.down.weight"), (f"unet.{stem}", "_lora.down.weight")]
                if not path.endswith("to_out.0"):  # ".processor." goes, but to_out keeps no ".0"
                    forms.append((f"unet.{stem}", ".lora.down.weight"))
            mag = f"{comp}.{path}.lora_magnitude_vector"
        else:
            mine = [k for k in keys if k.startswith(comp + ".")]
            peft_ok = any(re.search(r"(q|k|v|out)_proj\.lora_A\.weight$|lora_linear_layer", k) for k in mine)
            if mine and not peft_ok and not any("to_out_lora" in k for k in mine):
                r.error = f"Could not automatically infer state dict type ({comp} keys)"
                return r
            forms = [(f"{comp}.{path}", ".lora_linear_layer.down.weight"), (f"{comp}.{path}", ".lora_A.weight")]
            mag = f"{comp}.{path}.lora_magnitude_vector.weight"
        if any(stem + suffix in tensors for stem, suffix in forms):
            _count(r, m.alpha / m.rank, m.alpha / m.rank)  # its alpha rule is sdlora's reading of this format
            r.no_magnitude += m.magnitude is not None and mag not in tensors
    return r


def _diffusers_kohya(r: Reading, tensors: dict, header: dict, lora, fam: str) -> Reading:
    if header.get("lora_adapter_metadata"):
        r.error = "`network_alphas` and `metadata` cannot be specified both (kohya keys with lora_adapter_metadata)"
        return r
    odd = [k for k in tensors if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale"))]
    if odd:
        r.error = f"The following keys have not been correctly renamed: {odd[0]} … (LyCORIS factors)"
        return r
    names = {k.split(".")[0] for k in tensors}
    attention_ok = {}  # its text-encoder conversion needs an out_proj key to convert attention names
    for te, prefixes in (("text_encoder", ("lora_te_", "lora_te1_")), ("text_encoder_2", ("lora_te2_",))):
        mine = [n for n in names if n.startswith(prefixes)]
        attention_ok[te] = any("out_proj" in n for n in mine)
        if mine and not attention_ok[te] and not any("mlp" in n for n in mine):
            r.error = f"Could not automatically infer state dict type ({te} without out_proj)"
            return r
    ldm = any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)", n) for n in names)
    mixed = ldm and any(re.match(r"lora_unet_(down_blocks|mid_block|up_blocks)", n) for n in names)
    alphas = collections.defaultdict(list)  # per model, in the file's order: peft's lora_alpha is the most common
    for k, t in tensors.items():
        if k.endswith(".alpha"):
            alphas["unet" if k.startswith("lora_unet_") else "te2" if k.startswith("lora_te2_") else "te"].append(float(t))
    common = {c: collections.Counter(v).most_common(1)[0][0] for c, v in alphas.items()}
    for name, m in lora.modules.items():
        comp, path = name.split(".", 1)
        stem = _kohya_stem(tensors, comp, path, fam)
        if stem is None or (comp == "text_encoder_2" and fam != "sdxl") or m.kind != "lora":
            continue
        if comp == "unet" and ldm and (mixed or fam != "sdxl") and re.match(
                r"lora_unet_(input_blocks|middle_block|output_blocks|out_2|time_embed|label_emb)", stem):
            continue  # SDXL's original names: remapped only on SDXL, and dropped beside diffusers' names
        if comp != "unet" and "self_attn" in path and not attention_ok[comp]:
            continue  # left in diffusers' old attention names, which no text-encoder layer matches
        group = "unet" if comp == "unet" else "te2" if comp == "text_encoder_2" else "te"
        own = tensors.get(stem + ".alpha")
        # peft's alpha_pattern reaches UNet layers outside attention, and text-encoder MLPs when the installed
        # transformers names them text_model.… as the pattern does; the rest get the most common alpha
        keeps_own = (not re.search(r"\.to_(q|k|v|out)", path) if comp == "unet" else
                     "mlp" in path and formats.clip_has_text_model(TEXT_CLASSES[comp]))
        alpha = float(own) if keeps_own and own is not None else common.get(group, m.rank)
        _count(r, alpha / m.rank, m.alpha / m.rank)
        r.no_magnitude += m.magnitude is not None
    return r


def _kohya_stem(tensors, comp, path, fam) -> str | None:
    """The kohya name under which `comp`.`path` has its lora_down weight, if any."""
    return next((stem for stem in _names("comfyui", comp, path, fam)
                 if stem.startswith(_KOHYA_KEY) and stem + ".lora_down.weight" in tensors), None)


# ---------------------------------------------------------------- words

def summary(readings: list[Reading]) -> list[str]:
    """One line per loader: N of M layers, the scale(s) it applies, what it gets wrong."""
    lines = []
    for r in readings:
        if r.error:
            lines.append(f"{r.loader:10s} refuses the file: {r.error}")
            continue
        if not r.applied:
            lines.append(f"{r.loader:10s} none of {r.total} layers")
            continue
        scales = sorted(r.scales)
        text = f"scale {_g(scales[0])}" if len(scales) == 1 else f"scales {_g(scales[0])} to {_g(scales[-1])}"
        if r.loader != "diffusers" and not r.alpha_read:
            text += " (no alpha read)"
        line = f"{r.loader:10s} {r.applied} of {r.total} layers, {text}"
        if r.rescaled:
            line += f"; {r.rescaled} at another scale than the file's"
        if r.no_magnitude:
            line += f"; {r.no_magnitude} DoRA layers without their magnitude"
        lines.append(line)
    return lines


def warning(readings: list[Reading]) -> str | None:
    """One line naming the loaders that apply the file partially or at another scale; None if all are exact."""
    bad = [r for r in readings if not r.exact]
    if not bad:
        return None
    parts = []
    for r in bad:
        if r.error:
            parts.append(f"{r.loader} (refuses it)")
        elif not r.applied:
            parts.append(f"{r.loader} (none of {r.total} layers)")
        else:
            what = [f"{r.applied} of {r.total} layers"] if r.applied < r.total else []
            what += [f"{r.rescaled} rescaled"] if r.rescaled else []
            what += [f"{r.no_magnitude} without DoRA magnitude"] if r.no_magnitude else []
            parts.append(f"{r.loader} ({', '.join(what)})")
    return "loads partially or rescaled in " + ", ".join(parts)


def _g(x: float) -> str:
    return f"{x:.4g}"


def read_file(path, lora: formats.Lora, allow_pickle: bool = False) -> list[Reading]:
    """`read_by_loaders` for the weights file at `path` (as `formats.resolve_file` found it)."""
    tensors, header = formats.read_tensors(path, allow_pickle)
    return read_by_loaders(tensors, header, lora)


def advice(lora: formats.Lora) -> str:
    """What to use instead, for the end of the warning line."""
    if any(m.kind != "lora" for m in lora.modules.values()):
        return "the kohya layout (sdlora convert --to kohya) is what ComfyUI, A1111/Forge and LyCORIS read whole"
    return ("sdlora convert writes a layout each reads whole: --to kohya for ComfyUI, A1111/Forge and kohya's tools, "
            "--to diffusers for diffusers and ComfyUI")


def where(readings: list[Reading]) -> str:
    """One clause for a log line: the loaders that read the file whole at its scale, and how the others fall short."""
    whole = [r.loader for r in readings if r.exact]
    short = (warning([r for r in readings if not r.exact]) or "").removeprefix("loads partially or rescaled in ")
    text = f"read whole, at its scale, by {', '.join(whole)}" if whole else "read whole by no known loader"
    return text + (f"; partially or rescaled by {short}" if short else "")
