"""What an SD3 / 3.5 run writes at its end: its LoRA in diffusers' SD3 layout (output/sd3files.py), the header and the
model card; saving.save_final calls this for family "sd3"."""
from __future__ import annotations

import logging
from pathlib import Path

from .. import models
from ..lora import inject
from ..lora.formats import WEIGHTS_NAME
from ..output import modelcard, sd3files
from . import manifest
from .summary import summarize

log = logging.getLogger("sdlora")


def save_final(run) -> Path:
    c = run.config
    facts = summarize(run, WEIGHTS_NAME).facts()  # ComfyUI and Forge read the diffusers file itself
    path = c.output_dir / WEIGHTS_NAME
    record, written = manifest.Manifest(c.output_dir), (WEIGHTS_NAME, "README.md")
    record.will_write(*written)
    sd, _ = sd3files.save(path, {k: (p.bare, p.lora_config, p.initial) for k, p in run.parts.items()}, facts,
                          models.torch_dtype(c.save_precision))
    modelcard.write(c.output_dir, facts, run.recipe.card_front, run.recipe.card_settings)
    record.wrote(*written)
    log.info("saved %s (%d tensors, %d parameters, %.2f MB; for diffusers' StableDiffusion3Pipeline and ComfyUI) "
             "and README.md", path, len(sd), inject.count_params(sd), path.stat().st_size / 1e6)
    return path
