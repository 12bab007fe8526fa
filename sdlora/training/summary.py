"""What a finished run records about itself: `summarize` fills the `RunSummary` (output/facts.py declares its
facts and where the model card and the LoRA files' header write each one)."""
from __future__ import annotations

import logging
from pathlib import Path

from .. import models
from ..bases import hashes
from ..data.trainset import TrainSet
from ..lora import card, inject
from ..output.facts import RunSummary, own_settings
from . import earlystop, sd3run
from .run import Recipe, Run

log = logging.getLogger("sdlora")


def summarize(run: Run, kohya_file: str) -> RunSummary:
    """The summary of `run` as it ends (main process)."""
    c, recipe, data = run.config, run.recipe, run.recipe.data
    base = c.base_name
    # The Hub validates base_model as a repo id, and a pushed card or header must not carry a local path.
    local_base = Path(base).expanduser().exists() and base not in models.BUNDLED
    base_hashes = hashes.of(c.base) if c.base_config else {}
    if base_hashes:  # a single-file checkpoint: named by its file name, as kohya's ss_sd_model_name names it
        base = Path(c.base).name
    elif c.push_to_hub and local_base:
        log.warning("model card: base_model left out of the front matter (%s is a local path, not a Hub id)", base)
        base = Path(base).expanduser().resolve().name
    prediction = run.frozen.noise_scheduler.config.prediction_type
    repeated = sum(r.repeats > 1 for r in data.rows)
    rank, alpha = inject.file_rank_alpha(c.rank, c.lora_alpha, c.use_rslora, c.init_lora_weights != "gaussian")
    return RunSummary(
        base_model=base, base_model_in_front_matter=not (c.push_to_hub and local_base), base_is_local=local_base,
        base_sha256=base_hashes.get("sha256"), base_legacy_hash=base_hashes.get("legacy"),
        kind=recipe.kind, rank=rank, alpha=alpha, rslora=c.use_rslora or None, lora_type=c.lora_type,
        init=c.init_lora_weights if c.init_lora_weights != "gaussian" else None,
        target_modules=sd3run.targets(c) if c.family == "sd3" else list(c.target_modules),
        train_text_encoder=c.train_text_encoder, steps=run.step,
        epochs=run.num_epochs, train_batch_size=c.train_batch_size,
        gradient_accumulation_steps=c.gradient_accumulation_steps, learning_rate=c.learning_rate,
        lr_scheduler=c.lr_scheduler, resolution=c.resolution, mixed_precision=run.accelerator.mixed_precision,
        save_precision=c.save_precision, seed=run.seed, dataset=recipe.dataset_desc, num_images=len(data.rows),
        samples=run.samples, repo_id=c.hub_model_id if c.push_to_hub else None, extra_tags=recipe.extra_tags,
        example_prompt=c.validation_prompt or recipe.trigger_phrase, trigger_phrase=recipe.trigger_phrase,
        title=c.output_dir.resolve().name, kohya_file=kohya_file,
        architecture=models.architecture(run.parts["unet"].bare.config, prediction, c.family),
        prediction_type=prediction, family=models.describe(c.family, prediction),
        buckets=_bucket_summary(data), masked_loss=c.masked_loss or None,
        caption_ops=data.caption_ops.describe() if data.caption_ops else None, dataset_dirs=_dataset_dirs(recipe),
        repeat_folders=repeated and f"{repeated} images in N_name folders ({len(data)} examples per epoch)",
        vae=c.pretrained_vae_model_name_or_path and _public_name(c.pretrained_vae_model_name_or_path),
        zero_terminal_snr=c.zero_terminal_snr or None,
        quantize_base=c.quantize_base if c.quantize_base != "none" else None,
        best_val_loss=(f"{run.best_val_loss[0]:.5f} at step {run.best_val_loss[1]} "
                       f"({len(recipe.heldout.used_rows())} held-out images)"
                       f"{_early_note(run)}") if run.best_val_loss else None,
        license=base_license(c.base_name, c.base, c.family), settings={n: getattr(c, n) for n in own_settings()},
    )


# The licences the Stable Diffusion bases are released under, for a base whose own card can't be read (a Hub id's
# card is not downloaded with its weights): SD 1.x CreativeML Open RAIL-M, SD 2.x and SDXL Open RAIL++-M.
FAMILY_LICENSE = {"sd1": "creativeml-openrail-m", "sd2": "openrail++", "sdxl": "openrail++",
                  "sd3": "other"}  # SD3 / 3.5: the Stability AI Community License (no Hub licence id of its own)
BUNDLED_LICENSE = "apache-2.0"  # the bundled models were trained by this project's scripts: its LICENSE


def base_license(name: str, folder: str | None, family: str) -> str:
    """The licence for the card of a LoRA trained on this base: the bundled models' own, else the `license` in
    the base folder's model card, else its family's."""
    if name in models.BUNDLED:
        return BUNDLED_LICENSE
    own = card.card_field(Path(folder) / "README.md", "license") if folder and Path(folder).is_dir() else None
    return own or FAMILY_LICENSE.get(family, FAMILY_LICENSE["sd1"])


def _public_name(model: str) -> str:
    """A Hub id as given; a local folder by its name (a card or header must not carry a local path)."""
    return Path(model).expanduser().resolve().name if Path(model).expanduser().exists() else model


def _bucket_summary(data: TrainSet) -> str | None:
    """The model card's line on buckets; None (no line) when every image trained at the square size."""
    counts = data.bucket_report()[0]
    if not data.bucketing.enabled or list(counts) in ([], [(data.resolution, data.resolution)]):
        return None
    return ", ".join(f"{w}x{h} ({n})" for (w, h), n in counts.items())


def _dataset_dirs(recipe: Recipe) -> dict | None:
    """kohya's ss_dataset_dirs with each N_name folder and its repeats (None, the one-folder form, without any)."""
    rows = [r for r, g in zip(recipe.data.rows, recipe.data.groups) if g == 0]
    if all(r.repeats == 1 for r in rows):
        return None
    dirs: dict = {}
    for r in rows:
        d = dirs.setdefault(r.repeat_folder if r.repeats > 1 else recipe.dataset_desc,
                            {"n_repeats": r.repeats, "img_count": 0})
        d["img_count"] += 1
    return dirs


def _early_note(run: Run) -> str:
    """--early_stopping_patience: which step the saved weights are from."""
    if run.early_stop is None or run.early_stop.best is None:
        return ""
    return f"; the weights are this step's (early stopping; the last step's are in {earlystop.LAST_NAME})"
