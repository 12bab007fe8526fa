"""What sdlora lets through from diffusers, transformers and peft.

A few third-party notices are noise in sdlora's own commands and are filtered by their exact text;
every other warning still shows. Loading bars are hidden where sdlora loads many small files, and
`quiet()` hides a LoRA load's key reports once sdlora has checked the file itself.
"""
from __future__ import annotations

import contextlib
import logging

NOISE = {
    # transformers 5 without torchvision: sdlora never uses an image processor (the pipeline's
    # safety-checker feature extractor is imported, not used), and PIL is the intended backend.
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back",),
    # Loading a UNet-only LoRA: sdlora checked the file itself and knows it has no text-encoder part.
    "diffusers.loaders.lora_base": ("No LoRA keys associated to",),
    # diffusers imports bitsandbytes whenever it is installed, and on an AVX512-BF16 CPU bitsandbytes then looks for
    # a Hub kernel for its bf16 inference fast path, which sdlora's --quantize_base turns off (sdlora/quantize.py).
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
    # --quantize_base int8 (LLM.int8) rounds each layer's input through fp16 by design; logged on every call.
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast from",),
}


class _DropNoise(logging.Filter):
    def __init__(self, texts):
        super().__init__()
        self.texts = texts

    def filter(self, record):
        msg = record.getMessage()
        return not any(t in msg for t in self.texts)


def silence_noise():
    """Install the filters (idempotent). Call before diffusers is imported: the torchvision notice comes with it."""
    for name, texts in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(texts))


@contextlib.contextmanager
def no_progress_bars():
    """Hide diffusers'/transformers' per-file 'Loading weights' bars (Hub download bars are huggingface_hub's
    and stay); warnings are untouched."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    was = tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            tlog.enable_progress_bar()
        if was[1]:
            dlog.enable_progress_bar()


@contextlib.contextmanager
def quiet():
    """Also hide load-time key reports and 'multiple adapters' notes, for loads sdlora has checked itself;
    errors still raise."""
    import warnings

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    old = tlog.get_verbosity(), dlog.get_verbosity()
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    try:
        with no_progress_bars(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(peft_config|torch_dtype|deprecated).*")
            yield
    finally:
        tlog.set_verbosity(old[0])
        dlog.set_verbosity(old[1])
