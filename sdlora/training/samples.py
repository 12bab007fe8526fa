"""Sample prompts while training (--sample_prompts): when a round is due, and what a round writes.

A round draws every prompt of the file with the LoRA as it is at that step, into output_dir/samples/:
stepNNNNNN_II.png per prompt, carrying its parameters as `sdlora generate` records them (plus the
step), and stepNNNNNN_grid.png; tensorboard gets each prompt's image under samples/II. A prompt's seed
is the same in every round, so rounds compare like for like.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .. import pipeline
from ..io import png_bytes, write_bytes
from ..output import weights
from .config import TrainConfig
from . import sd3sample
from .manifest import Manifest
from .validation import Sampling, sampling

log = logging.getLogger("sdlora")
SCHEDULER = "dpm++"  # what `pipeline.assemble` samples with, under `sdlora generate`'s name for it


def due(config: TrainConfig, step: int, epochs_before: int, epochs: int, last: bool) -> bool:
    """Whether the optimizer step that just finished (and took the finished epochs from `epochs_before` to
    `epochs`) ends with a round: one round at most, whichever cadences fall on it."""
    c = config
    if not c.sample_prompts:
        return False
    if c.sample_every_n_steps is None and c.sample_every_n_epochs is None:
        return last
    by_steps = c.sample_every_n_steps is not None and step % c.sample_every_n_steps == 0
    # one step can finish several epochs (accumulating over more batches than an epoch has)
    n = c.sample_every_n_epochs
    by_epochs = n is not None and epochs // n > epochs_before // n
    return by_steps or by_epochs


def write_round(s: Sampling, step: int) -> list[Path]:
    """Sample every prompt at the current step; returns the PNGs written, the grid last. Main process only."""
    c = s.config
    out = Path(c.output_dir) / "samples"
    log.info("sampling %d prompt(s) from %s at step %d", len(c.sample_prompts), c.sample_prompts_file, step)
    seeds = [p.seed if p.seed is not None else s.seed + i for i, p in enumerate(c.sample_prompts)]
    with sampling(s) as (pipe, encode):
        images = [pipeline.sample(pipe, [p.prompt], [seed], p.steps, p.guidance, batch=1, encode=encode,
                                  width=p.width, height=p.height, negative_prompts=[p.negative])[0]
                  for p, seed in zip(c.sample_prompts, seeds)]
    # The LoRA under the name A1111/ComfyUI give its kohya file; no path, so the PNGs don't depend on where the run is.
    lora = [{"name": Path(weights.kohya_name(c.output_dir)).stem, "weight": 1.0}]
    digits = max(2, len(str(len(images) - 1)))
    scheduler = sd3sample.SCHEDULER if c.family == "sd3" else SCHEDULER
    Manifest(c.output_dir).will_make(out)
    paths = []
    for i, (p, seed, img) in enumerate(zip(c.sample_prompts, seeds, images)):
        params = pipeline.image_params(p.prompt, p.negative or None, seed, p.steps, p.guidance, img, scheduler,
                                       c.base_name, lora, step=step)
        paths.append(out / f"step{step:06d}_{i:0{digits}d}.png")
        write_bytes(paths[-1], png_bytes(img, pipeline.png_info(params)))
    paths.append(out / f"step{step:06d}_grid.png")
    write_bytes(paths[-1], png_bytes(pipeline.grid(images)))
    for tracker in s.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.log_images({f"samples/{i:0{digits}d}": np.asarray(img)[None] for i, img in enumerate(images)},
                               step=step, dataformats="NHWC")
    return paths
