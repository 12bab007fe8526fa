"""What a run writes: checkpoints while it runs, and at its end the LoRA files, their header and the model card."""
from __future__ import annotations

import logging
from pathlib import Path

from .. import models
from ..errors import UserError
from ..lora import adalora, formats, inject, loaders
from ..lora.formats import WEIGHTS_NAME
from ..output import modelcard, weights
from . import checkpoint, manifest
from .run import Run
from .summary import summarize

log = logging.getLogger("sdlora")


def save_checkpoint(run: Run, announce: bool = True) -> Path | None:
    """checkpoint-N at the step the run is on (main process; every process waits for it)."""
    run.accelerator.wait_for_everyone()
    path = None
    if run.main:
        path = checkpoint.save(run.config.output_dir, run.step, {k: c.bare for k, c in run.parts.items()},
                               run.optimizer, run.lr_scheduler, getattr(run.accelerator, "scaler", None), run.seed,
                               run.settings, run.config.checkpoints_total_limit, run.best_val_loss,
                               {k: adalora.state(c.tuner) for k, c in run.parts.items() if c.tuner is not None},
                               {k: v.state_dict() for k, v in (("ema", run.ema), ("early_stopping", run.early_stop))
                                if v is not None})
        if path and announce:
            log.info("saved %s", path)
    return path


def save_final(run: Run) -> Path:
    """The LoRA files (diffusers', and kohya's for ComfyUI/A1111), their header and the model card (main process).
    On SD3 the first file is diffusers' SD3 layout (`transformer.…`) and the second kohya's SD3 one (the MMDiT's
    original names, q/k/v fused: lora.formats.mmdit)."""
    c = run.config
    kohya_file = c.output_dir / weights.kohya_name(c.output_dir)
    facts = summarize(run, kohya_file.name).facts()
    path = c.output_dir / WEIGHTS_NAME
    record, written = manifest.Manifest(c.output_dir), [WEIGHTS_NAME, kohya_file.name, "README.md"]
    record.will_write(*written)  # only sdlora's own files are replaced
    sd, meta = weights.save(path, {k: (p.bare, p.lora_config, p.initial) for k, p in run.parts.items()}, facts,
                            models.torch_dtype(c.save_precision), denoiser=models.denoiser(c.family))
    files = [path, kohya_file]
    try:
        weights.save_kohya(kohya_file, sd, meta)
    except UserError as e:
        if c.family != "sd3":
            raise
        # q/k/v layers kohya's fused SD3 layout cannot hold (LoHa/LoKr, DoRA)
        log.warning("%s not written: %s", kohya_file.name, e)
        files, written, facts = [path], [WEIGHTS_NAME, "README.md"], {**facts, "kohya_file": None}
    _log_lora_type(run, sd, path, kohya_file)
    modelcard.write(c.output_dir, facts, run.recipe.card_front, run.recipe.card_settings)
    record.wrote(*written)
    reader = "for sdlora's loader: diffusers cannot read LoHa/LoKr" if c.lora_type in ("loha", "lokr") else \
        "for diffusers' StableDiffusion3Pipeline and ComfyUI" if c.family == "sd3" else "for diffusers"
    sd3_layout = "in kohya's SD3 layout, "
    log.info("saved %s (%d tensors, %d parameters, %.2f MB; %s)%s and README.md", path, len(sd),
             inject.count_params(sd), path.stat().st_size / 1e6, reader,
             f", {kohya_file.name} (the same LoRA {sd3_layout if c.family == 'sd3' else ''}for ComfyUI, A1111/Forge "
             "and kohya's tools)" if len(files) > 1 else "")
    for f in files:  # which loader applies which file whole (sdlora inspect's table, in one line each)
        log.info("%s: %s", f.name, loaders.where(loaders.read_file(f, formats.load_lora(f))))
    return path


def save_beside(run: Run, name: str, what: str) -> Path:
    """The LoRA as it is now, in diffusers' layout with the header, as `name` beside the output (main process): the
    raw weights of an EMA run, the last step's of an early-stopped one; `what` says which in the log."""
    c = run.config
    path, record = c.output_dir / name, manifest.Manifest(c.output_dir)
    record.will_write(name)  # only sdlora's own files are replaced
    facts = summarize(run, weights.kohya_name(c.output_dir)).facts()
    weights.save(path, {k: (p.bare, p.lora_config, p.initial) for k, p in run.parts.items()}, facts,
                 models.torch_dtype(c.save_precision), denoiser=models.denoiser(c.family))
    record.wrote(name)
    log.info("saved %s (%s)", path, what)
    return path


def _log_lora_type(run: Run, sd: dict, path: Path, kohya_file: Path):
    """What AdaLoRA saved (its final ranks), and where DoRA's files load exactly."""
    lora_type = run.config.lora_type
    if lora_type == "adalora":
        ranks = [v.shape[0] for k, v in sd.items() if k.endswith((".lora_A.weight", ".lora_linear_layer.down.weight"))]
        total = sum(adalora.initial_ranks(p.bare) for p in run.parts.values())
        log.info("AdaLoRA: saved %d layers at their final ranks (%d to %d, %d in all, from %d); %d layers pruned to "
                 "rank 0 left out", len(ranks), min(ranks), max(ranks), sum(ranks), total,
                 sum(1 for p in run.parts.values() for _ in adalora.layers(p.bare)) - len(ranks))
    if lora_type == "dora":
        log.warning("DoRA: %s holds LyCORIS's per-output-channel dora_scale, which LyCORIS applies exactly and "
                    "ComfyUI/Forge closely; A1111's built-in loader reads dora_scale per input channel and gets it "
                    "wrong, and diffusers drops it (it warns). diffusers applies %s exactly, sdlora both files",
                    kohya_file.name, path.name)


def save_stopped(run: Run, why: str) -> None:
    """Save checkpoint-N at the step the run is on (unless it just saved one) and say so in one line."""
    every = run.config.checkpointing_steps
    path = run.config.output_dir / f"checkpoint-{run.step}"
    if not (every and run.step % every == 0):
        path = save_checkpoint(run, announce=False)
    if run.main and path:
        log.info("%s at step %d of %d: saved %s; --resume_from_checkpoint latest continues it", why, run.step,
                 run.max_steps, path)
    elif run.main:  # checkpoint.save skipped it: a folder of the user's has that name (it logged why)
        log.info("%s at step %d of %d: no checkpoint saved", why, run.step, run.max_steps)
    run.accelerator.end_training()
