"""A diffusers Stable Diffusion folder written as one checkpoint in the original layout (CompVis' ldm for SD 1.x/2.x,
Stability's sgm for SDXL), the layout A1111, ComfyUI, kohya and Civitai files use.

Written from the published key-name facts of the two layouts, not from a conversion script:
- UNet under `model.diffusion_model.`: input_blocks.0.0 is conv_in; down block i, layer j is input_blocks.(1 + i(L+1) + j)
  (.0 its resnet, .1 its attention), its downsampler input_blocks.(1 + i(L+1) + L).0.op; middle_block.0/1/2 are
  resnet, attention, resnet; up block i, layer j is output_blocks.(i(L+1) + j), its upsampler .1.conv (.2.conv after an
  attention); resnets say in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection; time_embed.0/2,
  label_emb.0.0/2 (SDXL's added conditioning), out.0/2. (L: layers_per_block.)
- VAE under `first_stage_model.`: encoder.down.i.block.j / downsample.conv, decoder.up.(N-1-i).block.j /
  upsample.conv, mid.block_1/attn_1/block_2, norm_out, nin_shortcut; attention norm/q/k/v/proj_out as 1x1 convs.
- CLIP ViT-L (SD 1.x, SDXL's first encoder) keeps transformers' names under `cond_stage_model.transformer.` /
  `conditioner.embedders.0.transformer.`; OpenCLIP (SD 2.x, SDXL's second) under `cond_stage_model.model.` /
  `conditioner.embedders.1.model.` names resblocks.k.attn.in_proj_* (q, k, v stacked), ln_1/ln_2, mlp.c_fc/c_proj,
  token_embedding, positional_embedding, ln_final, text_projection (transposed).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

UNET, VAE = "model.diffusion_model.", "first_stage_model."
# Where each family keeps its text encoders, and which layout each is in.
TEXT = {"sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
        "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
        "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
                 "text_encoder_2": ("conditioner.embedders.1.model.", "openclip")}}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_key(key: str, layers: int, attention_ups: set[int]) -> str:
    """A diffusers UNet weight's name in the original layout. `attention_ups`: the up blocks with attentions."""
    parts = key.split(".")
    module, leaf = ".".join(parts[:-1]), parts[-1]
    for new, old in _TOP.items():
        if module == new:
            return f"{old}.{leaf}"
    kind = parts[0]
    if kind == "mid_block":
        which, j, rest = parts[1], int(parts[2]), parts[3:]
        index = 1 if which == "attentions" else 2 * j
        return _inner(f"middle_block.{index}", which, rest)
    i, which, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if kind == "down_blocks":
        if which == "downsamplers":
            return f"input_blocks.{1 + i * (layers + 1) + layers}.0.op.{rest[-1]}"
        return _inner(f"input_blocks.{1 + i * (layers + 1) + j}.{1 if which == 'attentions' else 0}", which, rest)
    if kind == "up_blocks":
        if which == "upsamplers":
            return f"output_blocks.{i * (layers + 1) + layers}.{2 if i in attention_ups else 1}.conv.{rest[-1]}"
        return _inner(f"output_blocks.{i * (layers + 1) + j}.{1 if which == 'attentions' else 0}", which, rest)
    raise KeyError(key)


def _inner(prefix: str, which: str, rest: list[str]) -> str:
    if which == "resnets":
        return f"{prefix}.{_RESNET.get(rest[0], rest[0])}.{'.'.join(rest[1:])}"
    return f"{prefix}.{'.'.join(rest)}"  # a transformer block keeps its names (norm, proj_in, transformer_blocks…)


def vae_key(key: str, blocks: int) -> str:
    """A diffusers VAE weight's name in the original layout (`blocks`: the number of down/up blocks)."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    side, rest = parts[0], parts[1:]
    if rest[0] == "conv_norm_out":
        return f"{side}.norm_out.{rest[-1]}"
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] == "mid_block":
        if rest[1] == "attentions":
            names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
            return f"{side}.mid.attn_1.{names[rest[3]]}.{rest[-1]}"
        return f"{side}.mid.block_{int(rest[2]) + 1}.{_vae_resnet(rest[3:])}"
    i = int(rest[1])
    where = f"down.{i}" if side == "encoder" else f"up.{blocks - 1 - i}"
    if rest[2] in ("downsamplers", "upsamplers"):
        return f"{side}.{where}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{rest[-1]}"
    return f"{side}.{where}.block.{rest[3]}.{_vae_resnet(rest[4:])}"


def _vae_resnet(rest: list[str]) -> str:
    return ".".join(["nin_shortcut" if rest[0] == "conv_shortcut" else rest[0], *rest[1:]])


def openclip_items(state: dict[str, torch.Tensor]):
    """(name, tensor) of a transformers CLIP text encoder's weights in OpenCLIP's layout."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for key, t in state.items():
        if key in fixed:
            yield fixed[key], t
        elif key == "text_projection.weight":
            yield "text_projection", t.T.contiguous()
        elif key.startswith("encoder.layers."):
            _, _, k, *rest = key.split(".")
            name = ".".join(rest)
            if name.startswith("self_attn.q_proj."):  # q, k, v stacked into one in_proj
                leaf = rest[-1]
                yield f"transformer.resblocks.{k}.attn.in_proj_{leaf}", torch.cat(
                    [state[f"encoder.layers.{k}.self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            elif not name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                name = (name.replace("self_attn.out_proj", "attn.out_proj").replace("layer_norm1", "ln_1")
                        .replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
                yield f"transformer.resblocks.{k}.{name}", t


def clip_items(state: dict[str, torch.Tensor]):
    """(name, tensor) of a transformers CLIP text encoder's weights as the original checkpoints keep them."""
    for key, t in state.items():
        if not key.endswith("position_ids"):
            yield ("" if key.startswith("text_model.") else "text_model.") + key, t


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def original_state(folder: str | Path, family: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The weights of a diffusers folder (safetensors, unsharded) under their original-layout names."""
    folder = Path(folder)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    layers = unet_config.get("layers_per_block", 2)
    ups = {i for i, t in enumerate(unet_config["up_block_types"]) if "CrossAttn" in t}
    out: dict[str, torch.Tensor] = {}
    for k, t in _read(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        out[UNET + unet_key(k, layers, ups)] = t
    blocks = len(vae_config["down_block_types"])
    for k, t in _read(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        name = vae_key(k, blocks)
        out[VAE + name] = t[..., None, None] if ".attn_1." in name and t.ndim == 2 else t
    for sub, (prefix, layout) in TEXT[family].items():
        items = (openclip_items if layout == "openclip" else clip_items)(_read(folder / sub / "model.safetensors"))
        out.update((prefix + k, t) for k, t in items)
    return {k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous() for k, t in out.items()}


def write(base: str, out: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False,
          markers: tuple[str, ...] = ()) -> tuple[Path, str]:
    """Write a diffusers SD folder (or a bundled name) as one original-layout .safetensors checkpoint; returns
    (the file, the family). `markers`: ComfyUI's "v_pred" / "ztsnr" marker keys to add (empty tensors)."""
    from safetensors.torch import save_file

    from .. import io, models
    from ..errors import UserError

    folder = models.resolve_base(str(base), flag="base")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: name the checkpoint to write *.safetensors")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; choose another name or pass --overwrite")
    family = models.family(folder)
    state = original_state(folder, family, dtype)
    state.update((m, torch.tensor([])) for m in markers)
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": models.architecture({}, family_=family)}
    with io.atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata=meta)  # streamed to disk (io.save_safetensors builds it in memory)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; the mode follows the umask, as sdlora's files
    return out, family
