"""A quantized frozen base (QLoRA-style): the UNet's frozen nn.Linear weights stored in 8 or 4 bits while the
LoRA on top trains in fp32.

  int8  bitsandbytes' LLM.int8() (Linear8bitLt: int8 weights, per-row scales, outlier threshold 6 as diffusers'
        and transformers' BitsAndBytesConfig default); peft's bnb Linear8bitLt LoRA layer
  nf4   bitsandbytes' 4-bit NormalFloat, double-quantized scales (QLoRA's format); peft's bnb Linear4bit LoRA layer

Both run on CUDA and on x86-64 CPUs with AVX2 (bitsandbytes >= 0.48's CPU backend; run here with 0.50.2 only).
Not torchao's int8 weight-only: it trains, but its backward keeps a full-precision copy of every weight until the
backward pass, so a training step's peak is no lower than unquantized (measured on a bare SD1.5 step: README).

Only nn.Linear layers change (attention, feed-forward, time-embedding projections); convolutions, norms and
embeddings keep their precision. The LoRA's own weights, and so the saved files, are the same as over the
unquantized base: they apply to the full-precision model at inference. torch and bitsandbytes are imported
lazily so the `sdlora` command starts fast.
"""
from __future__ import annotations

from . import sd3models
from .errors import UserError

MODES = ("none", "int8", "nf4")  # --quantize_base's choices
# bitsandbytes' first release whose CPU backend does 8-bit and 4-bit layers (its README's accelerator table)
CPU_BNB = "0.48"


def check(mode: str, cuda: bool) -> None:
    """Raise UserError when `mode` can't run here (bitsandbytes missing or too old, a CPU without AVX2), before any
    model loads."""
    if mode == "none":
        return
    if mode not in MODES:
        raise UserError(f"--quantize_base {mode}: unknown; expected one of {', '.join(MODES)}")
    installed = bnb_version()
    if installed is None:
        raise UserError(f"--quantize_base {mode} needs bitsandbytes: pip install bitsandbytes")
    if cuda:
        return
    from packaging.version import Version

    if Version(installed) < Version(CPU_BNB):
        raise UserError(f"--quantize_base {mode} on CPU needs bitsandbytes >= {CPU_BNB} (installed: "
                        f"{installed}): pip install -U bitsandbytes; or train on a CUDA GPU")
    if not has_avx2():
        raise UserError(f"--quantize_base {mode} on this CPU: bitsandbytes' CPU backend needs an x86-64 CPU with "
                        f"AVX2; use a CUDA GPU, or --quantize_base none")


def bnb_version() -> str | None:
    """bitsandbytes' version, or None when it isn't installed (diffusers reads the package metadata first, so an
    absent package costs no import)."""
    from diffusers.utils import is_bitsandbytes_available

    if not is_bitsandbytes_available():
        return None
    import bitsandbytes

    return bitsandbytes.__version__


def has_avx2() -> bool:
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return "avx2" in f.read().split()
    except OSError:  # not Linux: bitsandbytes' CPU backend is built for Linux x86-64 only
        return False


def load_unet(base: str, mode: str, device, dtype, revision=None, variant=None, cache_dir=None,
              allow_pickle=False, base_config=None, subfolder: str = "unet"):
    """(the base's UNet with its Linear layers in `mode` on `device` and the rest still on the CPU, how many). Each
    Linear is quantized as soon as its tensors are read (safetensors, one tensor at a time), so the full-precision
    UNet is never in memory whole (SD1.5's: 3.4 GB in fp32, 1.1 GB of it Linear weights). Anything the streamed read
    can't place takes diffusers' own loading, then `quantize_linears`. `subfolder` "transformer": an SD3 base's
    MMDiT."""
    import torch
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from . import streamload

    cls = SD3Transformer2DModel if subfolder == "transformer" else UNet2DConditionModel
    files = None if base_config else streamload.weights_files(base, subfolder, variant, revision, cache_dir)
    if files is not None:
        config = cls.load_config(base, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
        with torch.device("meta"):
            model = cls.from_config(config)
        linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
        pending: dict[str, dict] = {}
        try:
            for f in files:
                for key, t in streamload.iter_cast(f, dtype):
                    owner, _, attr = key.rpartition(".")
                    if owner in linears:
                        got = pending.setdefault(owner, {})
                        got[attr] = t
                        m = linears[owner]
                        if t.shape != getattr(m, attr).shape:
                            raise KeyError(key)
                        if "weight" in got and ("bias" in got or m.bias is None):
                            _replace(model, owner, _quantized(m, got["weight"], got.get("bias"), mode, device, dtype))
                            del pending[owner]
                    else:
                        module = model.get_submodule(owner)
                        have = module._parameters.get(attr, module._buffers.get(attr))
                        if have is None or have.shape != t.shape:
                            raise KeyError(key)
                        if attr in module._parameters:
                            module._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
                        else:
                            module._buffers[attr] = t
            complete = not pending and not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
        except (KeyError, AttributeError, RuntimeError):  # keys diffusers renames on load, an unknown dtype
            complete = False
        if complete:
            _flag(model, mode)
            model.register_to_config(_name_or_path=str(base))
            return model.eval(), len(linears)
    from .bases import load

    model = load.part(subfolder, base, base_config, revision=revision, variant=variant, cache_dir=cache_dir,
                      dtype=dtype, allow_pickle=allow_pickle) if subfolder == "unet" else \
        sd3models.load_transformer(base, revision, variant, cache_dir, dtype, allow_pickle)
    return model, quantize_linears(model, mode, device, dtype)


def quantize_linears(model, mode: str, device, compute_dtype) -> int:
    """Replace `model`'s nn.Linear layers by bitsandbytes' `mode` layers on `device`, in place, one at a time (the
    full-precision model never goes to the device whole); returns how many. Before LoRA injection: peft picks its
    bnb LoRA layer by the base layer's type and the model's is_loaded_in_4bit/8bit flag (as diffusers' own
    bitsandbytes loading sets it)."""
    import torch

    linears = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    for name, m in linears:
        _replace(model, name, _quantized(m, m.weight.data, None if m.bias is None else m.bias.data, mode, device,
                                         compute_dtype))
    _flag(model, mode)
    return len(linears)


def _quantized(m, weight, bias, mode: str, device, compute_dtype):
    """bitsandbytes' `mode` layer for nn.Linear `m` (whose own tensors may be on the meta device) on `device`."""
    import bitsandbytes as bnb
    import torch

    weight = weight.to(compute_dtype)
    if mode == "nf4":
        q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              quant_type="nf4", compress_statistics=True, device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        # Without this, an eval-mode no-grad forward on an AVX512-BF16 CPU (sampling, the held-out loss)
        # repacks the weight in place for a bf16 kernel, and every later training step computes differently.
        q.support_avx512bf16_for_cpu = False
    elif mode == "int8":
        q = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=bias is not None, has_fp16_weights=False,
                                threshold=INT8_THRESHOLD, device="meta")
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"unknown quantization {mode!r}")
    if bias is not None:
        q.bias = torch.nn.Parameter(bias.to(compute_dtype), requires_grad=False)
    # Params4bit / Int8Params quantize when they move to a (non-meta) device, on that device
    return q.to(device)


def _replace(model, name: str, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _flag(model, mode: str):
    """What peft reads to wrap bitsandbytes layers in its bnb LoRA layers (else it falls back to a plain Linear)."""
    if mode == "nf4":
        model.is_loaded_in_4bit = True
    else:
        model.is_loaded_in_8bit = True


INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, BitsAndBytesConfig's default


def quantized_linears(model) -> int:
    """How many of `model`'s layers are bitsandbytes' quantized linears (with or without a LoRA around them)."""
    import bitsandbytes as bnb

    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
