"""Building a `Run`, in stages that read top to bottom: the accelerator, the plan (seed, steps, the checked
checkpoint), the frozen models, the caches, the UNet, the trainable LoRA and optimizer, the resumed state.

Every problem with the plan or the checkpoint surfaces before any model loads."""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch

from .. import models, quantize
from ..bases import load as bases
from ..data.trainset import StreamSampler, TrainSet, loader
from ..lora import adalora
from . import (checkpoint, conditioning, diskcache, earlystop, ema, heldout, interrupt, manifest, optimizers, resume,
               sd3run, trainable)
from .caches import Caches, all_captions
from .caches import plan as cache_plan
from .config import TrainConfig
from .frozen import Frozen
from .frozen import load as load_frozen
from .hooks import Hooks
from .run import Recipe, Run

log = logging.getLogger("sdlora")


def mark(name: str):
    """Mark where a run is, at debug level: benchmarks/train_step.py reads these to report memory and time per phase.
    A signal before "train" stops the run at once, from "train" on after the step it is on (interrupt.py)."""
    interrupt.entered(name)
    log.debug("phase: %s", name)


@dataclass
class Plan:
    """What the run will do, known before any model loads."""
    ckpt: object  # checkpoint.Checkpoint to resume from, checked against `settings`; None for a new run
    seed: int
    step: int  # where the run starts
    sampler: StreamSampler
    max_steps: int
    num_epochs: int
    lr: float  # --learning_rate, scaled with --scale_lr
    settings: dict  # resume.settings: what a checkpoint records


def setup(config: TrainConfig, recipe: Recipe, hooks: Hooks | None = None) -> Run:
    """Accelerator, seed and schedule, the checked checkpoint, frozen models and caches, LoRA, optimizer."""
    accelerator, weight_dtype = make_accelerator(config)
    plan = plan_run(config, recipe, accelerator)
    mark("load text encoders and VAE")
    frozen = (sd3run.load_frozen if config.family == "sd3" else load_frozen)(
        config, accelerator.device, weight_dtype, accelerator.is_main_process)
    mark("cache")
    caches, held = build_caches(config, recipe, accelerator, frozen, plan.seed)
    mark("load UNet")
    unet = (sd3run.load_transformer if config.family == "sd3" else load_unet)(config, accelerator, weight_dtype)
    trained = trainable.build(config, accelerator, unet, frozen.text_encoders, plan.lr, plan.max_steps)
    frozen.text_encoders = {n: None if n in trained.parts else te for n, te in frozen.text_encoders.items()}
    if hooks and hooks.on_trainable:
        hooks.on_trainable(trained.parts)
    best = resume_state(plan, trained, accelerator)
    averaged, stopper = outcome_state(config, plan.ckpt, trained.parts)
    start_logging(config, recipe, accelerator, trained, weight_dtype, plan)
    batches = loader(recipe.data, plan.seed, plan.sampler, pixels=not frozen.latents_cached,
                     workers=0 if frozen.latents_cached else config.dataloader_num_workers)
    for c in trained.parts.values():
        c.module.train()
    optimizers.stepping(trained.optimizer)
    return Run(config=config, recipe=recipe, accelerator=accelerator, seed=plan.seed, settings=plan.settings,
               weight_dtype=weight_dtype, frozen=frozen, caches=caches, parts=trained.parts,
               optimizer=trained.optimizer, lr_scheduler=trained.lr_scheduler, sampler=plan.sampler,
               batches=iter(batches), max_steps=plan.max_steps, num_epochs=plan.num_epochs, step=plan.step,
               heldout_cache=held, best_val_loss=best, ema=averaged, early_stop=stopper)


def make_accelerator(config: TrainConfig):
    """(the Accelerator, the dtype of the frozen weights: the compute precision; LoRA weights stay fp32)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = config.output_dir
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / config.logging_dir)),
        # Without a GPU, `accelerate launch --num_processes N` must still mean N gloo processes.
        cpu=not torch.cuda.is_available(),
    )
    mixed = accelerator.mixed_precision
    weight_dtype = models.torch_dtype(mixed if mixed in ("fp16", "bf16") else "no")
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator, weight_dtype


def total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """The optimizer steps a run makes: --max_train_steps, else its epochs' micro-batches over the accumulation."""
    return config.max_train_steps or math.ceil(config.num_train_epochs * batches_per_epoch /
                                               config.gradient_accumulation_steps)


def plan_run(config: TrainConfig, recipe: Recipe, accelerator) -> Plan:
    """Seed, data order and step count; the checkpoint is read whole and checked against this run's settings."""
    main, world = accelerator.is_main_process, accelerator.num_processes
    ckpt = resume.find_checkpoint(config, main)
    seed = resume.seed(config, ckpt, world)
    torch.manual_seed(seed)
    ga = config.gradient_accumulation_steps
    step = ckpt.step if ckpt else 0
    data = recipe.data
    sampler = StreamSampler(len(data), config.train_batch_size, seed, accelerator.process_index, world,
                            start=step * ga, keys=[data.key(i) for i in range(len(data))])
    # Epochs count micro-batches: the stream runs on across epoch boundaries, so N epochs are
    # ceil(N * batches / accumulation) optimizer steps, not N * ceil(batches / accumulation).
    max_steps = total_steps(config, sampler.batches_per_epoch)
    num_epochs = math.ceil(max_steps * ga / sampler.batches_per_epoch)
    if main:  # before any model loads: a plan the user did not mean (hours of steps) can be stopped now
        log.info("plan: %d steps (%d epochs) at %d px%s, batch %d x %d accum x %d procs; the time per step is logged "
                 "after the first steps", max_steps - step, num_epochs, config.resolution,
                 f", resuming at step {step} of {max_steps}" if step else "", config.train_batch_size, ga, world)
    lr = config.learning_rate * (ga * config.train_batch_size * world if config.scale_lr else 1)
    settings = resume.settings(config, recipe, world, max_steps, lr)
    if ckpt:
        resume.check(config, ckpt, settings, main)
    return Plan(ckpt, seed, step, sampler, max_steps, num_epochs, lr, settings)


def build_caches(config: TrainConfig, recipe: Recipe, accelerator, frozen: Frozen, seed: int):
    """Encode once (latents, text embeddings, the held-out images), then the VAE / text encoders leave the
    training device. Returns (the caches, the held-out images' latents or None)."""
    main, device, data = accelerator.is_main_process, accelerator.device, recipe.data
    caches, (cache_latents, cache_text, why_not) = Caches(), cache_plan(config, data)
    vae, vae_dtype = frozen.vae, frozen.vae_dtype
    store = diskcache.LatentStore(config.latents_cache_dir, diskcache.vae_id(vae)) \
        if cache_latents and config.cache_latents_to_disk else None
    if cache_text:  # first: the text encoders (SD3's T5-XXL alone is 9 GiB) leave before the VAE encodes images
        tes, tokenizers = list(frozen.text_encoders.values()), frozen.tokenizers
        caches.build_embeds(all_captions(data) + (heldout.captions(recipe.heldout) if recipe.heldout else []),
                            sd3run.encoder(frozen, tes) if config.family == "sd3" else
                            lambda texts: conditioning.encode(tes, tokenizers, texts, recipe.max_length,
                                                              recipe.use_attention_mask, config.clip_skip))
        del tes
        frozen.text_encoders = {n: models.release(te, device) for n, te in frozen.text_encoders.items()}
        frozen.text_cached = True
    # On disk, the main process encodes first and the others find its entries.
    with accelerator.main_process_first() if store else contextlib.nullcontext():
        if cache_latents:
            caches.build_latents(data, seed, vae, device, vae_dtype, config.train_batch_size, main, store)
    held = recipe.heldout and heldout.encode(recipe.heldout, vae, device, vae_dtype, config.train_batch_size)
    if cache_latents:
        frozen.vae, frozen.latents_cached = models.release(vae, device), True
    if main:
        _log_caches(data, caches, cache_latents, cache_text, why_not, store, held)
    return caches, held


def _log_caches(data: TrainSet, caches: Caches, cache_latents: bool, cache_text: bool, why_not: str, store, held):
    _log_buckets(data)
    what = [f"VAE latents of {len(caches)} images"] * cache_latents + \
           [f"text embeddings of {len(caches.caption_ids)} captions"] * cache_text
    log.info("cached %s%s", " and ".join(what) if what else "nothing", f" (not cached: {why_not})" if why_not else "")
    if store:
        log.info("latent cache: %d of %d images reused, %d encoded (%s)", caches.reused, len(caches),
                 caches.encoded, store.root)
    if held:
        log.info("validation loss on %d held-out images, %d fixed timesteps each", len(held), heldout.TIMESTEPS)


def _log_buckets(data: TrainSet):
    """The bucket table and how much of the images it keeps, against a square crop (one table per dataset of a
    --dataset_config)."""
    if data.parts:
        for i in sorted({p.dataset for p in data.parts}):
            counts, kept, _ = data.bucket_report(i)
            sizing = next(p.bucketing for p in data.parts if p.dataset == i)
            names = ", ".join(p.name.split(": ", 1)[1] for p in data.parts if p.dataset == i)
            log.info("dataset %d (%s) at %d px, %s (w x h: images): %s; %.1f%% of each image's area kept", i + 1,
                     names, sizing.resolution, "buckets" if sizing.enabled else "square crops",
                     ", ".join(f"{w}x{h}: {n}" for (w, h), n in counts.items()), 100 * kept)
        return
    counts, kept, square = data.bucket_report()
    if not counts:  # `datasets` rows with --no_bucket: their sizes are only known as they load
        log.info("square %dx%d crops (--no_bucket)", data.resolution, data.resolution)
        return
    if not data.bucketing.enabled:
        log.info("square %dx%d crops (--no_bucket): %.1f%% of each image's area kept on average",
                 data.resolution, data.resolution, 100 * square)
        return
    table = ", ".join(f"{w}x{h}: {n}" for (w, h), n in counts.items())
    log.info("aspect-ratio buckets (w x h: images): %s; %.1f%% of each image's area kept on average "
             "(a square %d crop would keep %.1f%%)", table, 100 * kept, data.resolution, 100 * square)


def load_unet(config: TrainConfig, accelerator, weight_dtype: torch.dtype):
    """The frozen UNet on the training device; with --quantize_base its Linear layers in bitsandbytes' int8/NF4."""
    load = dict(revision=config.revision, cache_dir=config.cache_dir, variant=config.variant,
                allow_pickle=config.allow_pickle, dtype=weight_dtype, base_config=config.base_config)
    if config.quantize_base == "none":
        unet = bases.part("unet", config.base, **load)
    else:  # before LoRA injection: peft wraps the quantized layers in its bnb LoRA layers
        unet, n = quantize.load_unet(config.base, config.quantize_base, accelerator.device, **load)
        if accelerator.is_main_process:
            log.info("quantized base: %d Linear layers of the UNet in %s (bitsandbytes); convolutions in %s",
                     n, config.quantize_base, str(weight_dtype).replace("torch.", ""))
    return unet.to(accelerator.device)


def resume_state(plan: Plan, trained: trainable.Trainable, accelerator) -> list | None:
    """Put the checkpoint's LoRA, optimizer, schedule and AdaLoRA state into the fresh ones; returns the lowest
    validation loss it recorded ([loss, step], or None)."""
    ckpt = plan.ckpt
    if not ckpt:
        return None
    checkpoint.apply(ckpt, {k: c.bare for k, c in trained.parts.items()}, trained.optimizer, trained.lr_scheduler,
                     getattr(accelerator, "scaler", None))
    for k, c in trained.parts.items():
        if c.tuner is not None:  # the rank allocator's scores and frozen ranks, for an exact resume
            adalora.load_state(c.tuner, ckpt.extra.get(k, {}))
    if accelerator.is_main_process:
        log.info("resumed from %s at step %d", ckpt.path, plan.step)
    return ckpt.best_val_loss


def outcome_state(config: TrainConfig, ckpt, parts: dict):
    """(the EMA, the early stopping) of the run (None where off), as the checkpoint it resumes from left them."""
    averaged = ema.create(config, parts)
    stopper = earlystop.EarlyStop(config.early_stopping_patience) if config.early_stopping_patience else None
    states = (ckpt.states or {}) if ckpt else None
    if states is not None and averaged is not None:
        ema.load(averaged, states.get("ema"), ckpt.path)
    if states is not None and stopper is not None and "early_stopping" in states:
        stopper.load_state_dict(states["early_stopping"])
    return averaged, stopper


def start_logging(config: TrainConfig, recipe: Recipe, accelerator, trained: trainable.Trainable, weight_dtype,
                  plan: Plan):
    """The precision and the run in one line each, and the trackers (main process)."""
    if not accelerator.is_main_process:
        return
    params = [p for c in trained.parts.values() for p in c.params]
    note = models.precision_note(accelerator.mixed_precision, accelerator.device, config.precision_chosen)
    log.info("precision: %s; LoRA parameters in %s, frozen weights in %s (mixed precision: %s)",
             note, str(params[0].dtype).replace("torch.", ""),
             str(weight_dtype).replace("torch.", ""), accelerator.mixed_precision)
    if config.report_to != "none":
        manifest.Manifest(config.output_dir).will_make(config.output_dir / config.logging_dir)
    accelerator.init_trackers("sdlora", config=config.tracker_config())
    log.info("training %s LoRA: %d rows, %d trainable params, %d steps (%d epochs), batch %d x %d accum x %d procs",
             recipe.kind, len(recipe.data.rows), sum(p.numel() for p in params), plan.max_steps, plan.num_epochs,
             config.train_batch_size, config.gradient_accumulation_steps, accelerator.num_processes)

