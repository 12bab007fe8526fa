"""What an SD3 / 3.5 run writes at its end: its LoRA in diffusers' SD3 layout (output/sd3files.py), the same LoRA in
kohya's SD3 layout (the MMDiT's original names, q/k/v fused: lora.formats.mmdit) as the second file, the header and
the model card; saving.save_final calls this for family "sd3"."""
from __future__ import annotations

import logging
from pathlib import Path

from .. import models
from ..errors import UserError
from ..lora import formats, inject, loaders
from ..lora.formats import WEIGHTS_NAME
from ..output import modelcard, sd3files, weights
from . import manifest
from .summary import summarize

log = logging.getLogger("sdlora")


def save_final(run) -> Path:
    c = run.config
    kohya_file = c.output_dir / weights.kohya_name(c.output_dir)
    facts = summarize(run, kohya_file.name).facts()
    path = c.output_dir / WEIGHTS_NAME
    record, written = manifest.Manifest(c.output_dir), (WEIGHTS_NAME, kohya_file.name, "README.md")
    record.will_write(*written)
    sd, meta = sd3files.save(path, {k: (p.bare, p.lora_config, p.initial) for k, p in run.parts.items()}, facts,
                             models.torch_dtype(c.save_precision))
    files = [path, kohya_file]
    try:
        weights.save_kohya(kohya_file, sd, meta)
    except UserError as e:  # q/k/v layers kohya's fused layout cannot hold (LoHa/LoKr/DoRA; SD3 trains plain LoRA)
        log.warning("%s not written: %s", kohya_file.name, e)
        files, written = [path], (WEIGHTS_NAME, "README.md")
    modelcard.write(c.output_dir, facts, run.recipe.card_front, run.recipe.card_settings)
    record.wrote(*written)
    log.info("saved %s (%d tensors, %d parameters, %.2f MB; for diffusers' StableDiffusion3Pipeline and ComfyUI)%s "
             "and README.md", path, len(sd), inject.count_params(sd), path.stat().st_size / 1e6,
             f", {kohya_file.name} (the same LoRA in kohya's SD3 layout, for ComfyUI, Forge and kohya's tools)"
             if len(files) > 1 else "")
    for f in files:  # which loader applies which file whole (sdlora inspect's table, in one line each)
        log.info("%s: %s", f.name, loaders.where(loaders.read_file(f, formats.load_lora(f))))
    return path
