"""SD3 / 3.5 LoRA layers under the MMDiT's original (Stability AI) names, as kohya's sd-scripts write them
(networks/lora_sd3.py: ``lora_unet_`` + the SAI module path, "." as "_", e.g.
``lora_unet_joint_blocks_0_x_block_attn_qkv``) and ComfyUI maps them (every ``diffusion_model.`` weight is also
known as ``lora_unet_<path>``). diffusers' SD3Transformer2DModel splits what the original model fuses, so:

* a block's image-stream ``attn.to_q/k/v`` are one ``x_block.attn.qkv`` layer (rows q, k, v), its text-stream
  ``attn.add_q/k/v_proj`` one ``context_block.attn.qkv``, SD3.5 Medium's second attention ``attn2.to_q/k/v`` one
  ``x_block.attn2.qkv``. A fused LoRA layer stacks the parts' down weights and puts their up weights block-diagonal
  (each part's change lands on its own rows; kohya's split_qkv saves the same way), each part's rank recorded in the
  header (`RANKS_KEY`). Read back, each part takes its rows of up and its own columns (by the header; in a file
  without it, the columns of its rows that are not all zero), so any fused layer (a dense one too) splits exactly,
  and a part trained to zero (the last block's add_q_proj gets no gradient) comes back as it was;
* the last block's ``norm1_context.linear`` (2 chunks) and ``norm_out.linear`` hold (scale, shift) where the
  original holds (shift, scale): their output rows swap halves (diffusers' single-file SD3 converter).

The name facts are those of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`."""
from __future__ import annotations

import re

from ...errors import UserError
from ..lycoris import NAMES as LYCORIS_NAMES
from .layers import Module

RANKS_KEY = "sdlora_qkv_ranks"  # header: {SAI path of a fused qkv layer: [rank of q, k, v] (0: no such part)}

# diffusers path inside transformer_blocks.<i> -> (SAI path inside joint_blocks.<i>, which third of a fused qkv)
BLOCK = {"attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
         "attn.to_v": ("x_block.attn.qkv", 2), "attn.add_q_proj": ("context_block.attn.qkv", 0),
         "attn.add_k_proj": ("context_block.attn.qkv", 1), "attn.add_v_proj": ("context_block.attn.qkv", 2),
         "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
         "attn2.to_v": ("x_block.attn2.qkv", 2), "attn.to_out.0": ("x_block.attn.proj", None),
         "attn.to_add_out": ("context_block.attn.proj", None), "attn2.to_out.0": ("x_block.attn2.proj", None),
         "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
         "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
         "norm1.linear": ("x_block.adaLN_modulation.1", None),
         "norm1_context.linear": ("context_block.adaLN_modulation.1", None)}
# the layers outside the blocks
TOP = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
       "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
       "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
       "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
       "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
       "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
SAI_TOP = {v: k for k, v in TOP.items()}
SAI_BLOCK = {}
for _path, (_sai, _third) in BLOCK.items():
    SAI_BLOCK.setdefault(_sai, [None, None, None] if _third is not None else [None])[_third or 0] = _path
# an SAI path in a kohya key's body ("." as "_"), as a regex: joint_blocks_<i>_<block path>, or a top-level layer
SAI_KEY = re.compile(r"joint_blocks_(\d+)_(" + "|".join(re.escape(p.replace(".", "_")) for p in SAI_BLOCK) + ")|("
                     + "|".join(re.escape(p.replace(".", "_")) for p in SAI_TOP) + ")")


def sai_path(body: str) -> str | None:
    """A kohya key's body (`joint_blocks_0_x_block_attn_qkv`) as the SAI module path (`joint_blocks.0.x_block.attn.qkv`);
    None when it names no MMDiT layer."""
    m = SAI_KEY.fullmatch(body)
    if not m:
        return None
    if m.group(3):
        return next(p for p in SAI_TOP if p.replace(".", "_") == m.group(3))
    return f"joint_blocks.{m.group(1)}." + next(p for p in SAI_BLOCK if p.replace(".", "_") == m.group(2))


def sai_name(path: str) -> tuple[str | None, int | None]:
    """A diffusers transformer path as (the SAI path of the layer holding it, which third of a fused qkv or None);
    (None, None) for a path the original model has no layer for."""
    block = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path)
    if not block:
        return TOP.get(path), None
    sai, third = BLOCK.get(block.group(2), (None, None))
    return (f"joint_blocks.{block.group(1)}.{sai}" if sai else None), third


def _swapped(m: Module, path: str) -> bool:
    """Whether the layer's output rows are (shift, scale) in one layout and (scale, shift) in the other: the final
    norm, and the last block's 2-chunk text-stream norm (other blocks' have 6 chunks)."""
    return path in ("norm_out.linear", "final_layer.adaLN_modulation.1") or (
        path.endswith(("norm1_context.linear", "context_block.adaLN_modulation.1")) and m.out_features == 2 * m.in_features)


def _swap_halves(m: Module) -> Module:
    import torch

    a, b = m.up.chunk(2, dim=0)
    mag = None if m.magnitude is None else torch.cat(m.magnitude.chunk(2)[::-1])
    return Module(m.down, torch.cat([b, a]), m.alpha, mag)


def to_sai(modules: dict, source: str = "<memory>") -> tuple[dict, dict]:
    """{diffusers transformer path: layer} -> ({SAI path: layer}, q/k/v parts fused; {fused SAI path: the parts'
    ranks} for the header's RANKS_KEY)."""
    out, fused = {}, {}
    for path, m in modules.items():
        sai, third = sai_name(path)
        if sai is None:
            raise UserError(f"{source}: SD3 layer transformer.{path} has no name in the MMDiT's original layout "
                            "(kohya's); keep the diffusers layout (--to diffusers)")
        if third is None:
            out[sai] = _swap_halves(m) if _swapped(m, path) else m
            continue
        if m.kind != "lora" or m.magnitude is not None:
            kind = LYCORIS_NAMES.get(m.kind, "DoRA")
            raise UserError(f"{source}: SD3 layer transformer.{path} is a {kind} layer, which kohya's fused-qkv "
                            "layout cannot hold; keep the diffusers layout (--to diffusers)")
        fused.setdefault(sai, {})[third] = m
    out.update({sai: _fuse(parts) for sai, parts in fused.items()})
    return out, {sai: [parts[j].rank if j in parts else 0 for j in range(3)] for sai, parts in fused.items()}


def _fuse(parts: dict) -> Module:
    """One LoRA layer on the fused qkv: the parts' down weights stacked, their up weights block-diagonal, each
    part's alpha / rank folded into its up (alpha = rank: scale 1)."""
    import torch

    width = next(iter(parts.values())).out_features
    ranks = {j: m.rank for j, m in parts.items()}
    down = torch.cat([parts[j].down for j in sorted(parts)])
    up = torch.zeros(3 * width, down.shape[0], dtype=down.dtype)
    col = 0
    for j in sorted(parts):
        m = parts[j]
        up[j * width:(j + 1) * width, col:col + ranks[j]] = (m.up.float() * (m.alpha / m.rank)).to(up.dtype)
        col += ranks[j]
    return Module(down, up, float(down.shape[0]))


def from_sai(modules: dict, ranks: dict, source: str = "<memory>") -> dict:
    """{SAI path: layer} -> {diffusers transformer path: layer}, fused qkv layers split into q, k, v (`ranks`: the
    header's RANKS_KEY, {} if none)."""
    out = {}
    for sai, m in modules.items():
        block = re.fullmatch(r"joint_blocks\.(\d+)\.(.+)", sai)
        paths = SAI_BLOCK[block.group(2)] if block else [SAI_TOP[sai]]
        paths = [f"transformer_blocks.{block.group(1)}.{p}" for p in paths] if block else paths
        if len(paths) == 1:
            out[paths[0]] = _swap_halves(m) if _swapped(m, sai) else m
            continue
        if m.kind != "lora" or m.up.shape[0] % 3:
            raise UserError(f"{source}: layer {sai} is not a LoRA whose rows split into q, k and v; expected "
                            "kohya's SD3 layout")
        split = ranks.get(sai)
        if split is not None and (not isinstance(split, list) or len(split) != 3 or sum(split) != m.rank
                                  or not all(isinstance(r, int) and r >= 0 for r in split)):
            raise UserError(f"{source}: its {RANKS_KEY} header gives {sai} ranks {split}, not three that add up to "
                            f"its rank {m.rank}; the file is damaged (re-export it)")
        out.update(_split(m, paths, split))
    return out


def _split(m: Module, paths: list[str], ranks: list[int] | None) -> dict:
    """A fused qkv layer as its q, k, v parts: each part's rows of up, on its own columns (`ranks`: how many each
    has, in order), else on the columns where its rows are not all zero (a part with none is left out; a layer that
    is all zero keeps every part at every column)."""
    import torch

    width = m.out_features // 3
    rows = [m.up[j * width:(j + 1) * width] for j in range(3)]
    if ranks is not None:
        starts = [sum(ranks[:j]) for j in range(3)]
        cols = [torch.arange(starts[j], starts[j] + ranks[j]) for j in range(3)]
    else:
        cols = [r.flatten(1).abs().sum(0).nonzero().flatten() for r in rows]
        if not any(len(c) for c in cols):
            cols = [None] * 3
    parts = {}
    for path, r, c in zip(paths, rows, cols):
        if c is None:
            parts[path] = Module(m.down, r, m.alpha)
        elif len(c):
            parts[path] = Module(m.down[c], r[:, c], m.alpha * len(c) / m.rank)
    return parts
