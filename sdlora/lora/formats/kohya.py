"""kohya's layout (A1111, ComfyUI, Forge, kohya's sd-scripts, LyCORIS): ``lora_unet_<path, "_" for ".">`` /
``lora_te_…`` keys with ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` tensors, LyCORIS's LoHa/LoKr
factors (``.hada_*`` / ``.lokr_*``) and DoRA's ``.dora_scale``. SDXL's UNet layers go by the original-UNet names
kohya's sd-scripts use (names.sgm_pairs), its first text encoder by ``lora_te1_``; SD3's MMDiT layers by the original
model's names with q/k/v fused, as kohya's sd3_train_network writes them (mmdit), its CLIPs by ``lora_te1_`` /
``lora_te2_``."""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path

from ...errors import UserError
from . import mmdit
from .checks import json_value, show
from .families import lora_family
from .files import write_weights
from .names import KOHYA_KEY, KOHYA_PREFIX, PADDING_KEY, XL_KOHYA_PREFIX, kohya_name, sgm_pairs, swap_prefix
from .layers import with_modules
from .peftconfig import Alphas
from .reading import FACTORS, add, alpha_table, assemble

NAME = "kohya"
CONFIG_FILE = None  # alpha travels in the tensors


def detect(keys: list[str]) -> bool:
    return all(re.match(KOHYA_KEY, k) for k in keys)


def read(tensors: dict, metadata: dict, source, config: dict | None = None):
    """kohya's loaders read alpha from the tensors and r from their shapes: there is no config to check."""
    slots, name_of = {}, _name_reader(tensors)
    for k, t in tensors.items():
        m = re.fullmatch(rf"{KOHYA_KEY}(.+)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale|{FACTORS})", k)
        if not m:
            raise UserError(f"{source}: unsupported kohya key {show(k)}; expected .lora_down.weight, .lora_up.weight, "
                            ".alpha, DoRA's .dora_scale, or LyCORIS's LoHa (.hada_*) / LoKr (.lokr_*) factors")
        if m.group(3) != "alpha":
            which = {"lora_down.weight": "down", "lora_up.weight": "up", "dora_scale": "magnitude"}.get(m.group(3), m.group(3))
            add(slots, name_of(m.group(1), m.group(2)), which, t, k, source)
    alphas = Alphas(alpha_table(tensors, rf"{KOHYA_KEY}(.+)\.alpha", name_of, source))
    lora = assemble(NAME, slots, alphas, metadata, source, old_lycoris_dora=True)
    sai = {n.split(".", 1)[1]: m for n, m in lora.modules.items() if n.startswith(SAI)}
    if sai:  # SD3: the MMDiT's original names as diffusers' transformer paths, q/k/v split
        ranks = json_value(lora.metadata.pop(mmdit.RANKS_KEY, "{}"), f"{mmdit.RANKS_KEY} header", source)
        if not isinstance(ranks, dict):
            raise UserError(f"{source}: its {mmdit.RANKS_KEY} header is not a table of layers; the file is damaged "
                            "(re-export it)")
        lora.modules = {**{n: m for n, m in lora.modules.items() if not n.startswith(SAI)},
                        **{"transformer." + p: m for p, m in mmdit.from_sai(sai, ranks, source).items()}}
    return lora


SAI = "sai."  # while reading: the name prefix of an SD3 layer still under its original (SAI) name


def _name_reader(tensors: dict):
    """kohya_name, or for a file of SD3's MMDiT (kohya's lora_unet_joint_blocks_… keys) the layer's SAI path."""
    sd3 = any(re.match(r"lora_unet_(joint_blocks|x_embedder|context_embedder|final_layer)_", k) for k in tensors)

    def name_of(prefix: str, body: str) -> str:
        path = mmdit.sai_path(body) if sd3 and prefix == "lora_unet" else None
        return SAI + path if path else kohya_name(prefix, body)
    return name_of


def paths(folder: Path) -> list[Path]:
    """The files `write` puts in a folder."""
    return [folder / "lora.safetensors"]


def write(lora, out: Path, header: dict, dtype) -> Path:
    """`lora` as one kohya file: `out` itself (…safetensors) or in the folder `out`."""
    file = out if out.suffix == ".safetensors" else paths(out)[0]
    tensors, extra = kohya_tensors(lora)
    return write_weights(lora, out, file, tensors, {**header, **extra}, dtype)


def kohya_tensors(lora) -> tuple[dict, dict]:
    """`lora` in kohya's key layout, and its header entries."""
    import torch

    # One alpha for the whole file (the most common): diffusers' kohya loader ignores per-layer alphas of
    # attention layers, so other layers' scale is folded into `up` instead. The product is unchanged.
    family, extra = lora_family(lora)[0], {}
    if family == "sd3":  # the MMDiT's layers under the original model's names, q/k/v fused (mmdit)
        sai, ranks = mmdit.to_sai(lora.component("transformer"), lora.source)
        lora = with_modules(lora, {**{n: m for n, m in lora.modules.items() if not n.startswith("transformer.")},
                                   **{"unet." + p: m for p, m in sai.items()}})
        extra = {mmdit.RANKS_KEY: json.dumps(ranks)} if ranks else {}
    common = _common_alpha(lora)
    xl = family in ("sdxl", "sd3")  # kohya names their first text encoder lora_te1_, with or without the second
    prefix = {c: p + "_" for c, p in (XL_KOHYA_PREFIX if xl else KOHYA_PREFIX).items()}
    unet = _unet_paths(lora, family == "sdxl")
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
    padded = _pad_text_encoder(lora, out, prefix, common) if family != "sd3" else []  # diffusers reads no SD3 kohya file
    extra |= network_header(lora)
    kinds = {m.kind for m in lora.modules.values()} - {"lora"}
    if kinds:  # what LyCORIS's and kohya's tools read to rebuild the network
        extra |= {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": kinds.pop()})}
    if padded:
        extra[PADDING_KEY] = json.dumps(padded)
    return out, extra


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


def _unet_paths(lora, xl: bool) -> dict[str, str]:
    """{diffusers path: the path kohya names it by} for the UNet layers: an SDXL LoRA's in the original-UNet names
    kohya's sd-scripts use, when every layer has one (diffusers' loader drops the original names from a file that
    mixes both spellings); other families' (and any other SDXL file's) unchanged."""
    unet = list(lora.component("unet"))
    if xl:
        sgm = {p: swap_prefix(p, sgm_pairs(), reverse=True) for p in unet}
        if all(sgm[p] != p for p in unet):
            return sgm
    return {p: p for p in unet}


def _pad_text_encoder(lora, out, prefix, alpha) -> list[str]:
    """diffusers (<= 0.42) recognises a kohya text-encoder LoRA only by an `out_proj` key and raises
    "Could not automatically infer state dict type" otherwise (e.g. q/v-only or mlp-only files). Add one
    all-zero rank-1 out_proj pair per such encoder: its weight change is exactly 0, every loader accepts it,
    and the names go in the header (names.PADDING_KEY) so sdlora drops them again on reading."""
    import torch

    padded = []
    for comp in ("text_encoder", "text_encoder_2"):
        mods = lora.component(comp)
        if not mods or any(p.endswith("self_attn.out_proj") for p in mods):
            continue
        path, m = next(iter(mods.items()))
        hidden = m.out_features if path.endswith("fc2") else m.in_features
        layer = re.search(r"layers\.(\d+)\.", path)
        name = f"text_model.encoder.layers.{layer.group(1) if layer else 0}.self_attn.out_proj"
        key = prefix[comp] + name.replace(".", "_")
        down, up = (m.down, m.up) if m.kind == "lora" else [next(iter(m.factors.values()))] * 2  # LoHa/LoKr: a factor's dtype
        out[key + ".lora_down.weight"] = torch.zeros(1, hidden, dtype=down.dtype)
        out[key + ".lora_up.weight"] = torch.zeros(hidden, 1, dtype=up.dtype)
        out[key + ".alpha"] = torch.tensor(float(alpha))
        padded.append(f"{comp}.{name}")
    return padded
