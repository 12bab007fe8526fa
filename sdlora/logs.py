"""Third-party notices that are noise in sdlora's own commands, filtered by their exact text.

Only these are dropped; every other warning from diffusers, transformers or peft still shows.
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
}


class _DropNoise(logging.Filter):
    def __init__(self, texts):
        super().__init__()
        self.texts = texts

    def filter(self, record):
        msg = record.getMessage()
        return not any(t in msg for t in self.texts)


def silence_noise():
    """Install the filters (idempotent)."""
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
