"""Settings of speed and memory: precision, attention, compilation, a quantized base."""
from __future__ import annotations

from dataclasses import dataclass

from .declare import OPTIONAL, setting
from ...quantize import MODES as QUANTIZE_MODES


@dataclass(frozen=True, kw_only=True)
class SpeedSettings:
    mixed_precision: str | None = setting(  # resolved: the flag, else $ACCELERATE_MIXED_PRECISION
        help="default: accelerate's config / `accelerate launch --mixed_precision`", choices=["no", "fp16", "bf16"],
        card="mixed precision", header="ss_mixed_precision")
    precision_chosen: bool = False  # resolved: --mixed_precision given, so the log states it without advice against it
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, slower "
                                                  "steps")
    enable_xformers_memory_efficient_attention: bool = setting(
        False, "xformers' attention (CUDA only; PyTorch's SDPA attention is the default)")
    compile: bool = setting(False, "torch.compile the UNet's training steps (the first step compiles; slower on the "
                                   "CPUs measured, see the README)")
    allow_tf32: bool = setting(False, "TF32 matrix products on Ampere and newer GPUs (faster, slightly less exact)")
    quantize_base: str = setting(
        "none", "QLoRA-style: keep the UNet's frozen Linear weights in 8 bits (int8: bitsandbytes' LLM.int8) or 4 bits "
                "(nf4: QLoRA's NormalFloat4) while the LoRA trains in fp32; convolutions stay as they are. Needs "
                "bitsandbytes (a CUDA GPU, or an x86-64 CPU with AVX2). Saves memory, not time; the saved LoRA is the "
                "same kind of file (see the README)", choices=QUANTIZE_MODES, resume=OPTIONAL, card="quantized base",
        header="sdlora_quantize_base")
