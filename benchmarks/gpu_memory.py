#!/usr/bin/env python
"""Peak CUDA memory of one sdlora training step, predicted without a GPU (and measured with one: --measure).

Method. The step is the trainer's (sdlora/training/loop.py, caches on): the frozen UNet in fp16, peft LoRA on
to_q/to_k/to_v/to_out.0 with fp32 master weights (cast_training_params), the forward under fp16 autocast, an
fp32 MSE loss, backward, clipping, AdamW (or bitsandbytes' AdamW8bit), zero_grad(set_to_none). It runs for
real, twice (the second step has the optimizer states), on FakeTensorMode tensors: every torch op, the tensors
autograd saves, checkpointing's recomputation, gradient buffers and the optimizer's temporaries happen as on a
GPU, without storage or arithmetic. Counted on the way:

- live bytes: a TorchDispatchMode adds each op output whose storage is new (views and in-place results add
  nothing) and subtracts it when the storage dies; its maximum, with every storage rounded up to the CUDA
  caching allocator's 512-byte blocks, is the step's peak of torch.cuda.max_memory_allocated.
- saved activations: saved_tensors_hooks around the forward, one count per storage, weights and batch left out,
  only what autograd still holds when the forward ends.

What differs from a GPU, and how it is made to match:
- fp16 autocast: CPU autocast (torch.autocast("cpu", float16)) casts the same matmuls and convolutions to fp16
  as CUDA's; CUDA's also runs group_norm, layer_norm and nearest upsampling in fp32 (AT_FORALL_FP32 in
  torch/include/ATen/autocast_mode.h) and CPU's does not, so `CudaAutocast` casts their inputs to fp32 first,
  above autograd, as CUDA's autocast does (tests/test_gpu_memory.py checks every op the UNets run against
  CUDA's lists).
- attention: in fp16 on a GPU, scaled_dot_product_attention runs a fused kernel (flash, or memory-efficient,
  or xformers with --enable_xformers_memory_efficient_attention) that saves the output and a logsumexp, never
  the tokens x tokens matrix; `CudaAutocast` calls aten._scaled_dot_product_flash_attention, whose shape
  function gives what CUDA's flash kernel allocates.
- AdamW and clipping run their foreach implementations (CUDA's default). AdamW8bit is not run (bitsandbytes
  has no fake kernels): `AdamW8bitStates` allocates the states bitsandbytes allocates, updated in place.
- Not seen on fake tensors: cuBLAS's workspace (32 MiB on Hopper) and cuDNN's convolution workspaces, which
  come from the caching allocator and so count in max_memory_allocated, and kernels' own scratch: `MARGIN` adds
  5 % + 256 MiB for them, a judgement, not a measurement. The CUDA context (~0.5 GiB on an H100 with lazy
  loading, more once cuDNN loads its kernels) is outside max_memory_allocated, as are the allocator's cached
  but free blocks; nvidia-smi shows both.

Checks: tests/test_gpu_memory.py runs this accounting on a tiny UNet and compares it with what the CPU
allocator really does (the profiler's allocation events) in the same step on real tensors; --crosscheck
counts a row's peak again with torch's own fake-tensor memory tool (MemTracker).

    python benchmarks/gpu_memory.py              # the tables and JSON: ~1.5 min on 2 cores, +2 min per SD3.5 row
    python benchmarks/gpu_memory.py --measure    # on a CUDA machine: also run each row and measure it
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

GiB = 2**30
CUDA_BLOCK = 512  # the CUDA caching allocator's allocation granularity (bytes)
MARGIN = (0.05, 256 * 2**20)  # workspaces and kernel scratch not seen on fake tensors: 5 % of the peak + 256 MiB
CUDA_CONTEXT = 0.5 * GiB  # outside max_memory_allocated; what nvidia-smi adds (H100, CUDA 12, lazy loading)


def storage_bytes(storage, block: int = 1) -> int:
    n = storage.nbytes()
    return -(-n // block) * block


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive: op outputs with a storage not seen before are added, and subtracted
    when the storage dies; `peak` and the `phase` it happened in. Tensors made before entering: `add` them."""

    def __init__(self, block: int = 1):
        super().__init__()
        self.block, self.now, self.peak, self.phase, self.peak_phase = block, 0, 0, "setup", None
        self._live = set()

    def add(self, *tensors):
        for t in tensors:
            st = t.untyped_storage()
            if id(st) in self._live:
                continue
            n = storage_bytes(st, self.block)
            self._live.add(id(st))
            weakref.finalize(st, self._free, id(st), n)
            self.now += n
            if self.now > self.peak:
                self.peak, self.peak_phase = self.now, self.phase

    def _free(self, key, n):
        self._live.discard(key)
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.add(*[t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


@contextlib.contextmanager
def saved_activations(exclude, found: dict, block: int = 1):
    """Fill `found` with {storage: bytes} of the tensors autograd saves for backward inside the block and still
    holds at its end (a node nothing needs a gradient from drops what it saved), one count per storage, leaving
    out the storages of `exclude` (weights and inputs, counted as such)."""
    skip = {StorageWeakRef(t.untyped_storage()) for t in exclude}

    def pack(t):
        key = StorageWeakRef(t.untyped_storage())
        if key not in skip and key not in found:
            found[key] = storage_bytes(t.untyped_storage(), block)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield found
    for key in [k for k in found if k.expired()]:
        del found[key]


class CudaAutocast(TorchFunctionMode):
    """Under CPU fp16 autocast, what CUDA's autocast does and CPU's does not: group_norm, layer_norm and nearest
    upsampling in fp32 (their inputs cast first, as autocast casts them, so autograd records the casts), and
    attention through CUDA's flash kernel (with the shapes its meta function gives) instead of CPU's."""

    FP32 = {F.group_norm, F.layer_norm, F.interpolate}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _flash_attention(*args, **kwargs)
        if func in self.FP32 and torch.is_autocast_enabled("cpu"):
            args, kwargs = torch.utils._pytree.tree_map_only(
                torch.Tensor, lambda t: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t, (args, kwargs))
        return func(*args, **kwargs)


def checkpoint_under(mode_cls):
    """diffusers' gradient checkpointing function (non-reentrant), entering `mode_cls` inside the checkpointed
    call: the autograd engine does not carry torch-function modes into the recomputation."""
    def checkpoint(module, *args):
        def run(*a):
            with mode_cls():
                return module(*a)
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
    return checkpoint


def _flash_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None and not enable_gqa and not torch.is_grad_enabled():  # T5's position bias, encoding:
        return torch.ops.aten._scaled_dot_product_efficient_attention(  # CUDA's memory-efficient kernel takes it
            q, k, v, attn_mask.to(q.dtype), False, dropout_p, is_causal, scale=scale)[0]
    if attn_mask is not None or enable_gqa:
        raise NotImplementedError("an attention mask or GQA would not use the flash kernel")
    if torch.is_autocast_enabled("cpu"):  # SDPA is on autocast's fp16 list
        q, k, v = (t.to(torch.get_autocast_dtype("cpu")) for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]


class AdamW8bitStates(torch.optim.Optimizer):
    """The memory of bitsandbytes' AdamW8bit (Optimizer2State.init_state, block-wise): a parameter of 4096
    elements or more gets two uint8 states and two fp32 absmax per 256-element block (2048 in older releases);
    smaller ones get two fp32 states; the two quantile maps (256 fp32 each) are shared. The update is one
    in-place kernel per parameter, so only the states are made."""

    def __init__(self, params, lr=1e-4):
        super().__init__(params, {"lr": lr})
        self.qmaps = []

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p in self.state:
                    continue
                if p.numel() < 4096:
                    self.state[p] = {"state1": torch.zeros_like(p), "state2": torch.zeros_like(p)}
                else:
                    blocks = -(-p.numel() // 256)
                    self.state[p] = {f"{k}{i}": torch.zeros(*shape, dtype=dt, device=p.device)
                                     for i in (1, 2) for k, shape, dt in (("state", p.shape, torch.uint8),
                                                                         ("absmax", (blocks,), torch.float32))}
        if not self.qmaps and self.state:
            self.qmaps = [torch.zeros(256, device=next(iter(self.state)).device) for _ in range(2)]


def state_shapes(p, kind: str) -> list[tuple[tuple, torch.dtype]]:
    """(shape, dtype) of each state `kind` keeps for parameter `p` (--optimizer Prodigy, Adafactor, Lion8bit):
    prodigyopt 1.1 (slice_p 1): s, p0, exp_avg, exp_avg_sq, each like the parameter (p0 is 0-dim for a parameter
    that is all zeros at its first step, as LoRA's B matrices are: counted in full, an upper bound); transformers' Adafactor
    (relative step, no first moment): the second moment factored into rows and columns for a parameter of 2 or
    more dimensions, whole otherwise; bitsandbytes' Lion8bit (Optimizer1State): one uint8 state and an fp32 absmax
    per 256-element block from 4096 elements on, one fp32 state below (and one shared 256-entry quantile map)."""
    shape = tuple(p.shape)
    if kind == "prodigy":
        return [(shape, p.dtype)] * 4
    if kind == "adafactor":
        return [(shape[:-1], p.dtype), (shape[:-2] + shape[-1:], p.dtype)] if len(shape) >= 2 else [(shape, p.dtype)]
    if kind == "lion8bit":
        return [(shape, torch.float32)] if p.numel() < 4096 else \
            [(shape, torch.uint8), ((-(-p.numel() // 256),), torch.float32)]
    raise ValueError(kind)


class StatesOf(torch.optim.Optimizer):
    """The memory of an optimizer that cannot run on fake tensors (Prodigy and Adafactor read values with
    .item(); bitsandbytes has no fake kernels): its states (`state_shapes`), allocated at its first step. The
    updates' temporaries are one LoRA parameter's size at a time (a few hundred KiB) and not made."""

    def __init__(self, params, kind: str):
        super().__init__(params, {"lr": 1e-4})
        self.kind, self.shared = kind, []

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p not in self.state:
                    self.state[p] = {f"s{i}": torch.zeros(shape, dtype=dt, device=p.device)
                                     for i, (shape, dt) in enumerate(state_shapes(p, self.kind))}
        if self.kind == "lion8bit" and not self.shared and self.state:
            self.shared = [torch.zeros(256, device=next(iter(self.state)).device)]


def optimizer_state_bytes(params, kind: str, block: int = 1) -> int:
    """AdamW's (exp_avg, exp_avg_sq: fp32 like the parameter), AdamW8bit's or `state_shapes`' state bytes, from
    shapes alone. AdamW's `step` counter is a host tensor on CUDA and left out."""
    r = lambda n: -(-n // block) * block  # noqa: E731
    if kind in ("prodigy", "adafactor", "lion8bit"):
        return r(256 * 4) * (kind == "lion8bit") + sum(
            r(math.prod(shape) * torch.empty((), dtype=dt).element_size()) for p in params
            for shape, dt in state_shapes(p, kind))
    if kind == "adamw":
        return sum(2 * r(p.numel() * p.element_size()) for p in params)
    total = 2 * r(256 * 4)  # the shared quantile maps
    for p in params:
        n = p.numel()
        total += 2 * r(n * 4) if n < 4096 else 2 * (r(n) + r(-(-n // 256) * 4))
    return total


@dataclass
class Row:
    name: str
    arch: str
    resolution: int
    checkpointing: bool = False
    optimizer: str = "adamw"  # or "adamw8bit", "prodigy", "adafactor", "lion8bit"
    cache: bool = True  # False: the VAE and text encoder stay on the GPU and encode every step (--no_cache)
    batch: int = 1
    rank: int = 4
    dtype: str = "fp16"  # the frozen weights and autocast: fp16, or bf16 (SD3 rows: --mixed_precision bf16)
    t5: bool = True  # SD3 rows: T5-XXL loaded for the caching phase (False: --drop_t5)


def is_sd3(arch: str) -> bool:
    from sdlora.tiny_sd3 import SD3_ARCHS

    return arch in SD3_ARCHS


ROWS = [
    Row("SD1.5 512 px", "sd15", 512),
    Row("SD1.5 512 px + checkpointing", "sd15", 512, checkpointing=True),
    Row("SD1.5 512 px + checkpointing + 8-bit Adam", "sd15", 512, checkpointing=True, optimizer="adamw8bit"),
    Row("SD1.5 512 px + checkpointing, --no_cache", "sd15", 512, checkpointing=True, cache=False),
    Row("SDXL 1024 px + checkpointing (cached text embeddings)", "sdxl", 1024, checkpointing=True),
    *(Row(f"{name} + checkpointing + {label}", arch, res, checkpointing=True, optimizer=kind)
      for name, arch, res in (("SD1.5 512 px", "sd15", 512), ("SDXL 1024 px", "sdxl", 1024))
      for kind, label in (("prodigy", "Prodigy"), ("adafactor", "Adafactor"), ("lion8bit", "8-bit Lion"))),
    *(Row(f"{name} 1024 px + checkpointing, bf16{label}", arch, 1024, checkpointing=True, dtype="bf16", t5=t5)
      for name, arch in (("SD3.5 Medium", "sd35-medium"), ("SD3.5 Large", "sd35-large"))
      for t5, label in ((True, ""), (False, ", --drop_t5"))),
]


def preset_rows() -> list[Row]:
    """The shipped presets (`sdlora presets`) as rows: their model, size, batch, rank, checkpointing and optimizer."""
    from sdlora.recipes import RECIPES, configfile, presets

    rows = []
    for name in presets.names():
        info = presets.about(name)
        recipe = RECIPES[info["recipe"]]
        v = configfile.read(recipe.parser(), presets.path(name), "--preset", info["recipe"])
        rows.append(Row(f"preset {name} ({info['label']})", info["arch"], v["resolution"],
                        checkpointing=v.get("gradient_checkpointing", False),
                        optimizer="adamw8bit" if v.get("use_8bit_adam") else "adamw", cache=not v.get("no_cache"),
                        batch=v.get("train_batch_size", 1) * (2 if v.get("with_prior_preservation") else 1),
                        rank=v.get("rank", 4)))  # prior preservation: an instance and a class image per example
    return rows


def lora_unet(config: dict, dtype, rank: int):
    """The frozen UNet in `dtype` with the trainer's LoRA (fp32 master weights), on the meta device."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params

    from sdlora.lora import inject

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).to(dtype)
    inject.add_lora(unet, inject.lora_config(rank, None, inject.UNET_TARGETS))
    cast_training_params(unet, dtype=torch.float32)
    return unet.train()


def lora_transformer(config: dict, dtype, rank: int):
    """SD3's frozen MMDiT in `dtype` with the trainer's LoRA (sdlora's SD3 default layers: both streams'
    attention, sd3base.TRANSFORMER_TARGETS; fp32 master weights), on the meta device."""
    from diffusers import SD3Transformer2DModel
    from diffusers.training_utils import cast_training_params

    from sdlora.lora import inject
    from sdlora.sd3base import TRANSFORMER_TARGETS

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config).to(dtype)
    inject.add_lora(model, inject.lora_config(rank, None, list(TRANSFORMER_TARGETS)))
    cast_training_params(model, dtype=torch.float32)
    return model.train()


def lora_model(row: Row, dtype):
    """The row's frozen UNet or (SD3) MMDiT with LoRA, on the meta device."""
    from sdlora.tiny import ARCHS
    from sdlora.tiny_sd3 import SD3_ARCHS

    if is_sd3(row.arch):
        return lora_transformer(SD3_ARCHS[row.arch]["transformer"], dtype, row.rank)
    return lora_unet(ARCHS[row.arch]["unet"], dtype, row.rank)


def sd3_encoders(arch: str, dtype, t5: bool = True) -> dict:
    """SD3's VAE and text encoders (CLIP-L, CLIP-G, T5-XXL with their real vocabularies: 49408 and 32128 tokens)
    in `dtype` on the meta device, as sd3run.load_frozen puts them on the training device; T5 left out if not `t5`."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sdlora.tiny_sd3 import SD3_ARCHS

    cfg = SD3_ARCHS[arch]
    with torch.device("meta"):
        parts = {"vae": AutoencoderKL(**cfg["vae"]),
                 **{n: CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **cfg[k]))
                    for n, k in (("text_encoder", "text"), ("text_encoder_2", "text_2"))}}
        if t5:
            parts["text_encoder_3"] = T5EncoderModel(T5Config(vocab_size=32128, **cfg["t5"]))
    return {n: m.to(dtype).requires_grad_(False).eval() for n, m in parts.items()}


def sd3_caching(row: Row, captions: int = 32) -> dict:
    """The caching phase of an SD3 run on the GPU (setup.build_caches): the VAE and text encoders all on the device
    in the row's dtype; the prompts encoded first, in batches of `captions` (Caches.build_embeds' 32: an upper bound
    for fewer captions): both CLIPs' hidden states and T5's `max_sequence_length` tokens (sd3cond); then the text
    encoders leave and the latents are encoded (batch: the row's). No autocast (the encoders run in their dtype);
    attention on CUDA's fused kernels (`CudaAutocast`). Peak live bytes and the predicted allocated peak (+ MARGIN)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sdlora.tiny_sd3 import SD3_ARCHS
    from sdlora.training.config import default_of

    import gc

    dtype = row_dtype(row)
    parts, tokens = sd3_encoders(row.arch, dtype, row.t5), default_of("max_sequence_length")
    with FakeTensorMode(allow_non_fake_inputs=True):
        for m in parts.values():
            materialise(m, "cpu", init=False)
        live = LiveBytes(CUDA_BLOCK)
        weights = {n: [t for t in [*m.parameters(), *m.buffers()]] for n, m in parts.items()}
        for ts in weights.values():
            live.add(*ts)
        vae_weights = sum(storage_bytes(t.untyped_storage(), CUDA_BLOCK) for t in weights["vae"])
        text_weights = live.now - vae_weights
        with live, torch.no_grad(), CudaAutocast():
            live.phase = "cache text"
            ids = torch.zeros(captions, 77, dtype=torch.long)
            clips = [parts[n](ids, output_hidden_states=True) for n in ("text_encoder", "text_encoder_2")]
            hidden = torch.cat([c.hidden_states[-2] for c in clips], dim=-1)
            pooled = torch.cat([c[0] for c in clips], dim=-1)
            del clips
            if "text_encoder_3" in parts:
                t5 = parts["text_encoder_3"](torch.zeros(captions, tokens, dtype=torch.long))[0]
            else:
                t5 = hidden.new_zeros(captions, tokens, SD3_ARCHS[row.arch]["transformer"]["joint_attention_dim"])
            embeds = torch.cat([F.pad(hidden, (0, t5.shape[-1] - hidden.shape[-1])), t5], dim=-2)
            embeds.cpu(), pooled.cpu()
            del hidden, pooled, t5, embeds
        for n in [n for n in parts if n != "vae"]:
            del parts[n], weights[n]
        gc.collect()  # the text encoders' storages die here
        text_peak, live.peak = live.peak, 0
        live.now = vae_weights  # the text encoders went to the host (models.release)
        with live, torch.no_grad(), CudaAutocast():
            live.phase = "cache latents"
            pixels = torch.randn(row.batch, 3, row.resolution, row.resolution, dtype=dtype)
            posterior = parts["vae"].encode(pixels).latent_dist.parameters.float()
            del pixels, posterior
    peak = max(text_peak, live.peak)
    return {"caching_weights": text_weights, "caching_peak": peak,
            "caching_predicted": int(peak * (1 + MARGIN[0]) + MARGIN[1]),
            "caching_peak_in": "cache text" if text_peak >= live.peak else "cache latents"}


def frozen_encoders(arch: str, dtype, device="meta"):
    """SD1.x's VAE and CLIP text encoder (its real 49408-token vocabulary) in `dtype`, on the meta device, or
    built for real on `device` (CLIP's position ids are a buffer that materialise would leave empty)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdlora.tiny import ARCHS

    with torch.device(device):
        vae = AutoencoderKL(**ARCHS[arch]["vae"]).to(dtype)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **ARCHS[arch]["text"])).to(dtype)
    return vae.requires_grad_(False), te.requires_grad_(False)


@torch.no_grad()
def materialise(module, device, init: bool = True):
    """Storage for a meta module on `device` (fake storage under FakeTensorMode); `init`: small random numbers."""
    module.to_empty(device=device)
    if init:
        for t in module.parameters():
            t.normal_(0, 0.02)
    return module


def make_batch(unet, row: Row, dtype, device) -> dict:
    """What the trainer puts on the device for one micro-step: latents and noise (fp32), timesteps, the noisy
    latents and text conditioning in `dtype` (SDXL: pooled text and time ids too)."""
    c, b, lat = unet.config, row.batch, row.resolution // 8
    if "joint_attention_dim" in c:
        return make_sd3_batch(c, row, dtype, device)
    latents = torch.randn(b, 4, lat, lat, device=device)
    noise = torch.randn_like(latents)
    batch = {"latents": latents, "noise": noise, "t": torch.randint(0, 1000, (b,), device=device),
             "text": torch.randn(b, 77, c.cross_attention_dim, device=device, dtype=dtype), "extra": {}}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        batch["extra"] = {"added_cond_kwargs": {"text_embeds": torch.randn(b, pooled, device=device, dtype=dtype),
                                                "time_ids": torch.randn(b, 6, device=device, dtype=dtype)}}
    return batch


def make_sd3_batch(c, row: Row, dtype, device) -> dict:
    """SD3's micro-step batch (sd3run.loss): latents and noise (fp32, the VAE's 16 channels), timesteps and their
    sigmas, the joint prompt embeddings [B, 77 CLIP + max_sequence_length T5 tokens, joint_attention_dim] (the
    same length with --drop_t5: T5's tokens are zeros) and the pooled projections, in `dtype`."""
    from sdlora.training.config import default_of

    b, lat, tokens = row.batch, row.resolution // 8, 77 + default_of("max_sequence_length")
    latents = torch.randn(b, c.in_channels, lat, lat, device=device)
    return {"latents": latents, "noise": torch.randn_like(latents), "t": torch.rand(b, device=device) * 1000,
            "sigmas": torch.rand(b, 1, 1, 1, device=device),
            "text": torch.randn(b, tokens, c.joint_attention_dim, device=device, dtype=dtype),
            "extra": {"pooled_projections": torch.randn(b, c.pooled_projection_dim, device=device, dtype=dtype)}}


def forward_loss(model, batch, autocast, saved=None):
    """The forward under autocast and the fp32 loss: the UNet's MSE on the noise, or (SD3, a "sigmas" batch)
    flow.per_sample_loss with sdlora's defaults (logit_normal weighting: 1, preconditioned outputs)."""
    from types import SimpleNamespace

    from sdlora.training import flow

    noisy = (batch["latents"] * 0.7 + batch["noise"] * 0.7).to(batch["text"].dtype)  # add_noise, then .to(dtype)
    with saved or contextlib.nullcontext(), autocast:
        if "sigmas" in batch:
            pred = model(hidden_states=noisy, timestep=batch["t"], encoder_hidden_states=batch["text"],
                         return_dict=False, **batch["extra"])[0]
        else:
            pred = model(noisy, batch["t"], batch["text"], return_dict=False, **batch["extra"])[0]
    if "sigmas" in batch:
        noised = flow.Noised(noisy, batch["t"], batch["sigmas"])
        config = SimpleNamespace(precondition_outputs=1, weighting_scheme="logit_normal")
        return flow.per_sample_loss(pred, batch["latents"], batch["noise"], noised, config).mean()
    return F.mse_loss(pred.float(), batch["noise"], reduction="none").mean(dim=(1, 2, 3)).mean()


def train_step(unet, params, optimizer, batch, autocast, phase=lambda name: None, saved=None, encoders=None,
               scaler=None, foreach=None):
    """One optimizer step as sdlora's trainer takes it (one micro-step, max_grad_norm 1.0).
    `phase(name)` marks where the step is; `saved` is entered around the forward; `encoders` (VAE, text
    encoder) encode pixels and token ids first, as with --no_cache; `foreach`: the clipping's (CUDA: True)."""
    if encoders is not None:
        phase("encode")
        vae, te = encoders
        with torch.no_grad():
            pixels = torch.randn(batch["latents"].shape[0], 3, *(8 * s for s in batch["latents"].shape[-2:]),
                                 device=batch["latents"].device, dtype=vae.dtype)
            vae.encode(pixels).latent_dist.parameters.float()
            batch = dict(batch, text=te(torch.zeros(pixels.shape[0], 77, dtype=torch.long, device=pixels.device))[0])
    phase("forward")
    loss = forward_loss(unet, batch, autocast, saved)
    phase("backward")
    (scaler.scale(loss) if scaler else loss).backward()
    phase("optimizer")
    if scaler:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=foreach)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def make_optimizer(params, kind: str, foreach: bool | None = None):
    if kind == "adamw8bit":
        return AdamW8bitStates(params)
    if kind in ("prodigy", "adafactor", "lion8bit"):
        return StatesOf(params, kind)
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, foreach=foreach)


def account(unet, params, optimizer, batch, autocast, block: int, steps: int = 2, encoders=None,
            foreach=None) -> dict:
    """Run `steps` training steps under the byte counters. Bytes of: frozen weights, LoRA params, grads and
    optimizer states (from shapes), the batch, activations saved by the last forward, live bytes at the end of
    the last forward; the peak of live bytes and the phase it happened in."""
    frozen = [t for m in (unet, *(encoders or ())) for t in [*m.parameters(), *m.buffers()] if not t.requires_grad]
    weights = sum(storage_bytes(t.untyped_storage(), block) for t in frozen)
    lora = sum(storage_bytes(p.untyped_storage(), block) for p in params)
    kind = "adamw8bit" if isinstance(optimizer, AdamW8bitStates) else getattr(optimizer, "kind", "adamw")
    inputs = torch.utils._pytree.tree_leaves(batch)
    live = LiveBytes(block)
    live.add(*frozen, *params, *inputs)
    on_batch, marks = live.now - weights - lora, {}

    def phase(name):
        live.phase = name
        marks[name] = live.now

    with live:
        for _ in range(steps):
            saved = {}
            train_step(unet, params, optimizer, batch, autocast, phase,
                       saved_activations([*frozen, *params, *inputs], saved, block), encoders, foreach=foreach)
    return {"weights": weights, "lora_params": lora, "lora_grads": lora,
            "optimizer_states": optimizer_state_bytes(params, kind, block), "batch_bytes": on_batch,
            "saved_activations": sum(saved.values()), "live_after_forward": marks["backward"], "peak": live.peak,
            "peak_phase": live.peak_phase}


@contextlib.contextmanager
def fake_step(row: Row, gpu: bool = True):
    """Yields the row's (unet, params, optimizer, batch, encoders, autocast) on fake tensors, inside their
    FakeTensorMode and, for `gpu`, CudaAutocast: fp16, CUDA's autocast and attention, foreach AdamW.
    `gpu=False`: the step as it runs on a CPU in fp32 (what tests/test_gpu_memory.py checks against reality)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype, mode = (row_dtype(row), CudaAutocast) if gpu else (torch.float32, contextlib.nullcontext)
    unet = lora_model(row, dtype)
    if row.checkpointing:
        unet.enable_gradient_checkpointing(checkpoint_under(mode))
    encoders = None if row.cache else frozen_encoders(row.arch, dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for m in (unet, *(encoders or ())):
            materialise(m, "cpu", init=False)
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, row.optimizer, foreach=True)
        batch = make_batch(unet, row, dtype, "cpu")
        autocast = torch.autocast("cpu", dtype=dtype) if gpu else contextlib.nullcontext()
        with mode():
            yield unet, params, optimizer, batch, encoders, autocast


def row_dtype(row: Row):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[row.dtype]


def predict(row: Row, steps: int = 2, gpu: bool = True, block: int | None = None) -> dict:
    """`account` for a row on fake tensors (see fake_step), in 512-byte blocks for `gpu`, plus the margin: the
    predicted torch.cuda.max_memory_allocated."""
    with fake_step(row, gpu) as (unet, params, optimizer, batch, encoders, autocast):
        block = block or (CUDA_BLOCK if gpu else 1)
        res = account(unet, params, optimizer, batch, autocast, block, steps, encoders, foreach=True)
    res["predicted"] = int(res["peak"] * (1 + MARGIN[0]) + MARGIN[1])
    if gpu and is_sd3(row.arch) and row.cache:  # the run's other peak: its encoders, before the transformer loads
        res.update(sd3_caching(row))
        res["run_predicted"] = max(res["predicted"], res["caching_predicted"])
    return res


def memtracker_peak(row: Row, steps: int = 2) -> int:
    """The peak of the same step under torch's own fake-tensor memory tool (torch.distributed._tools.MemTracker,
    unrounded on fake CPU tensors), to compare with `predict(row, block=1)["peak"]`. Slow (minutes for SD1.5).
    MemTracker puts a gradient hook on every parameter, which frozen ones refuse: they get a no-op one here."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class NoHook:
        def remove(self):
            pass

    hooks = torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook
    torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook = (
        lambda t, h, f=f: f(t, h) if t.requires_grad else NoHook() for f in hooks)
    try:
        with fake_step(row) as (unet, params, optimizer, batch, encoders, autocast):
            tracker = MemTracker()
            tracker.track_external(unet, *(encoders or ()), optimizer, *torch.utils._pytree.tree_leaves(batch))
            with tracker:
                for _ in range(steps):
                    train_step(unet, params, optimizer, batch, autocast, encoders=encoders, foreach=True)
                    tracker.reset_mod_stats()  # it counts one call per module per iteration
            return max(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    finally:
        torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook = hooks


def measure(row: Row, steps: int = 5, warmup: int = 2) -> dict:
    """The row for real on the CUDA GPU: torch.cuda.max_memory_allocated over the steps, it/s, and what the
    device holds beyond the allocator's reserve (the CUDA context, plus any other process)."""
    import gc
    import statistics

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    dtype = row_dtype(row)
    unet = materialise(lora_model(row, dtype), "cuda")
    params = [p for p in unet.parameters() if p.requires_grad]
    if row.checkpointing:
        unet.enable_gradient_checkpointing()
    encoders = None if row.cache else tuple(m.to("cuda") for m in frozen_encoders(row.arch, dtype, "cpu"))
    if row.optimizer != "adamw":  # the libraries' own optimizers (the bnb and optimizers extras)
        optimizer = real_optimizer(row.optimizer, params)
    else:
        optimizer = make_optimizer(params, "adamw")
    batch = make_batch(unet, row, dtype, "cuda")
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None  # bf16: no loss scaling
    times = []
    for _ in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(unet, params, optimizer, batch, torch.autocast("cuda", dtype=dtype), encoders=encoders,
                   scaler=scaler)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    free, total = torch.cuda.mem_get_info()
    res = {"measured_peak": torch.cuda.max_memory_allocated(), "it_per_s": 1 / statistics.median(times[warmup:]),
           "measured_reserved": torch.cuda.max_memory_reserved(), "optimizer_stepped": bool(optimizer.state),
           "context_and_other_processes": total - free - torch.cuda.memory_reserved()}
    return res


def real_optimizer(kind: str, params):
    """--measure: the library's own optimizer for a row's kind, as sdlora's --optimizer builds it."""
    if kind in ("adamw8bit", "lion8bit"):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=1e-2) if kind == "adamw8bit" else \
            bnb.optim.Lion8bit(params, lr=1e-4)
    if kind == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=1.0, weight_decay=1e-2)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=None, relative_step=True)


def _gb(n: float) -> str:
    return f"{n / GiB:.2f}"


def table(results: list[dict]) -> str:
    """The markdown table, in GiB (the LoRA column in MiB)."""
    lines = ["| configuration | weights | LoRA + grads + optimizer (MiB) | saved activations | peak of the step "
             "| **predicted peak allocated** (+5 % + 256 MiB) | + CUDA context | peak in |", "|" + "---|" * 8]
    for r in results:
        lora = (r["lora_params"] + r["lora_grads"] + r["optimizer_states"]) / 2**20
        measured = f" (measured {_gb(r['measured_peak'])}, {r['it_per_s']:.2f} it/s)" if "measured_peak" in r else ""
        lines.append(f"| {r['name']} | {_gb(r['weights'])} | {lora:.1f} | {_gb(r['saved_activations'])} "
                     f"| {_gb(r['peak'])} | **{_gb(r['predicted'])}**{measured} | {_gb(r['predicted'] + CUDA_CONTEXT)} "
                     f"| {r['peak_phase']} |")
    return "\n".join(lines)


def sd3_table(results: list[dict]) -> str:
    """SD3 rows: the training step's and the caching phase's predicted peaks, and the run's (their maximum), GiB."""
    lines = ["| SD3 configuration | step: predicted peak allocated | caching: encoders' weights | caching: predicted "
             "peak allocated | **run's predicted peak** | + CUDA context |", "|" + "---|" * 6]
    for r in results:
        if "run_predicted" in r:
            lines.append(f"| {r['name']} | {_gb(r['predicted'])} | {_gb(r['caching_weights'])} "
                         f"| {_gb(r['caching_predicted'])} ({r['caching_peak_in']}) | **{_gb(r['run_predicted'])}** "
                         f"| {_gb(r['run_predicted'] + CUDA_CONTEXT)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="also run each row on the CUDA GPU")
    p.add_argument("--only", action="append", choices=[r.name for r in ROWS], metavar="ROW",
                   help="only this row (repeatable): " + "; ".join(repr(r.name) for r in ROWS))
    p.add_argument("--crosscheck", action="store_true",
                   help="also count each row's peak with torch's MemTracker (minutes per row; compare unrounded)")
    p.add_argument("--presets", action="store_true", help="predict the shipped presets instead of the rows above")
    a = p.parse_args()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every build
    if a.measure and not torch.cuda.is_available():
        p.error("--measure needs a CUDA GPU")
    results = []
    for row in preset_rows() if a.presets else ROWS:
        if a.only and row.name not in a.only:
            continue
        t0 = time.perf_counter()
        res = {**asdict(row), **predict(row), "predict_s": round(time.perf_counter() - t0, 1)}
        if a.crosscheck:
            res["peak_unrounded"], res["memtracker_peak"] = predict(row, block=1)["peak"], memtracker_peak(row)
        if a.measure:
            try:
                res.update(measure(row))
            except (ImportError, torch.cuda.OutOfMemoryError) as e:  # no bitsandbytes, or a small GPU: other rows
                res["measure_error"] = repr(e)
        results.append(res)
    print(table(results))
    print(sd3_table(results))
    print(json.dumps({"torch": torch.__version__, "units": "bytes", "margin": MARGIN, "cuda_context": CUDA_CONTEXT,
                      "device": torch.cuda.get_device_name() if a.measure else None, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
