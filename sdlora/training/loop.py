"""The one training loop, shared by the text-to-image and DreamBooth recipes.

A recipe hands over a `Recipe` (a TrainSet: rows grouped into examples, each row tagged with a
loss group; per-group loss weights; model-card facts) and the checked `TrainConfig`; everything
else — caching, LoRA injection, mixed precision, accumulation, clipping, checkpoints, validation,
saving — happens here, once. `train` reads top to bottom: `setup` builds one `Run`, then each
`optimizer_step` is `accumulation` micro-steps, with checkpoints and samples when they are due.

Reproducibility contract: every random number of step s (data order, augmentation, VAE
sample, noise, timesteps) is a pure function of (seed, s, process), so a resumed run
replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import models, quantize
from ..data.trainset import StreamSampler, TrainSet, loader
from ..errors import UserError
from ..lora import adalora, formats, inject, loaders
from ..lora.formats import WEIGHTS_NAME
from ..output import modelcard, weights
from . import checkpoint, conditioning, diskcache, heldout, interrupt, losses, manifest, samples, validation
from .caches import Caches, all_captions, latent_mask, plan
from .config import TrainConfig, adalora_schedule

log = logging.getLogger("sdlora")


@dataclass
class Recipe:
    """What differs between the scripts: data, loss weights per group, and model-card facts."""
    kind: str  # "text-to-image" or "dreambooth"
    data: TrainSet
    group_weights: dict[int, float] = field(default_factory=lambda: {0: 1.0})
    group_names: dict[int, str] = field(default_factory=lambda: {0: "loss"})
    dataset_desc: str = ""
    card_front: dict = field(default_factory=dict)
    card_settings: dict = field(default_factory=dict)
    max_length: int | None = None  # tokenizer length override (DreamBooth's --tokenizer_max_length)
    use_attention_mask: bool = False
    extra_tags: list[str] = field(default_factory=list)
    trigger_phrase: str | None = None  # what calls up the trained subject (DreamBooth's instance prompt)
    heldout: TrainSet | None = None  # images kept out of training, for the validation loss


@dataclass
class Component:
    """One model being trained: its peft LoRA config, the module as accelerate prepared it (maybe
    DDP-wrapped), the bare module, and its trainable LoRA parameters."""
    lora_config: object
    module: torch.nn.Module
    bare: torch.nn.Module
    params: list
    initial: dict | None = None  # PiSSA/OLoRA: the adapter as injected (inject.initial_weights), for saving
    tuner: object = None  # AdaLoRA: peft's AdaLoraModel, whose rank allocator the loop calls each step


@dataclass
class Run:
    """Everything a training run holds while it runs; built once by `setup`."""
    config: TrainConfig
    recipe: Recipe
    accelerator: object
    seed: int
    settings: dict  # what a checkpoint records, so a resume can be checked against it
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype  # weight_dtype, except SDXL's own VAE under fp16 (it overflows): fp32
    tokenizers: list  # one per text encoder, in conditioning order
    noise_scheduler: object
    vae: torch.nn.Module | None  # None once released after caching (CPU), reloaded to sample
    vae_scale: float
    # "text_encoder"[, "text_encoder_2"] -> the frozen encoder (None once released, or when trained: see parts)
    text_encoders: dict[str, torch.nn.Module | None]
    caches: Caches
    cache_latents: bool
    parts: dict[str, Component]  # "unet", and the text encoder(s) with --train_text_encoder
    optimizer: object
    lr_scheduler: object
    sampler: StreamSampler
    batches: object
    max_steps: int
    num_epochs: int
    step: int
    samples: list = field(default_factory=list)  # the latest validation images, for the model card
    heldout_cache: Caches | None = None  # held-out images' latents, for the validation loss
    best_val_loss: list | None = None  # [loss, step] of the lowest validation loss so far

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def epoch(self) -> int:
        return (self.step * self.config.gradient_accumulation_steps) // self.sampler.batches_per_epoch

    def encoders(self, bare: bool = False) -> list:
        """The text encoders in conditioning order: a trained one with its LoRA, else the frozen one."""
        return [(self.parts[n].bare if bare else self.parts[n].module) if n in self.parts else self.text_encoders[n]
                for n in self.text_encoders]


def train(config: TrainConfig, recipe: Recipe, on_step=None, should_stop=None, on_phase=None) -> Path | None:
    """Train and save; returns the weights file (None on other processes than the main one, and after a stop).
    `on_step(step, logs)` is called after every optimizer step (benchmarks and the UI use it; `logs` also
    carries `max_steps`; `s_per_step` is the step's own time). When `should_stop()` turns true (a string: why, for
    the log line), the run saves a checkpoint at the step it is on and returns None, so `--resume_from_checkpoint
    latest` continues it exactly (Ctrl+C and SIGTERM through cli.train.run, the UI's Stop). Every process calls it
    after every step. `on_phase(name)` is called when the run turns to "training", "validating", "sampling" or
    "saving" (the UI shows what a run does between steps)."""
    from tqdm.auto import tqdm

    doing = [None]

    def phase(name):
        if on_phase and doing[0] != name:
            doing[0] = name
            on_phase(name)

    run = setup(config, recipe)
    if config.sample_prompts and config.sample_at_first:
        phase("sampling")
        samples.take(run)
    if recipe.heldout and run.step == 0:  # where the validation loss starts, before any training
        phase("validating")
        if (v := validation_loss(run)) is not None:
            log.info("validation loss before training: %.5f", v)
            run.accelerator.log({"val_loss": v}, step=0)
    _phase("train")
    stopped = None
    # `with`: the bar ends its line even when a save fails, so the error starts on a line of its own
    with tqdm(total=run.max_steps, initial=run.step, desc="steps", disable=not run.main, dynamic_ncols=True) as bar:
        pace = Pace(run.main)
        while run.step < run.max_steps:
            epoch_before = run.epoch
            phase("training")
            t_step = time.perf_counter()
            logs = optimizer_step(run)
            pace.add(time.perf_counter() - t_step, run.max_steps - run.step)
            check_finite(run, logs)
            logs["s_per_step"] = time.perf_counter() - t_step  # the step alone: not the sampling and saving after it
            if _val_loss_due(config.validation_loss_steps, run, epoch_before):
                phase("validating")
                if (v := validation_loss(run)) is not None:
                    logs["val_loss"] = v
            run.accelerator.log(logs, step=run.step)
            if on_step:
                on_step(run.step, dict(logs, max_steps=run.max_steps))
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}",
                            **({"val_loss": f"{logs['val_loss']:.4f}"} if "val_loss" in logs else {}))
            if config.checkpointing_steps and run.step % config.checkpointing_steps == 0:
                phase("saving")
                save_checkpoint(run)
            new_epoch = run.epoch > epoch_before and run.epoch % config.validation_epochs == 0
            if config.validation_prompt and (new_epoch or run.step == run.max_steps):
                phase("sampling")
                if run.main:
                    run.samples = validation.validate(run)
                run.accelerator.wait_for_everyone()
            if samples.due(config, run.step, epoch_before, run.epoch, last=run.step == run.max_steps):
                phase("sampling")
                samples.take(run)
            if should_stop and (why := should_stop()) and run.step < run.max_steps:
                stopped = why if isinstance(why, str) else "stopped"
                break
    if stopped:  # after the bar has ended its line
        phase("saving")
        return _stop(run, stopped)
    run.accelerator.wait_for_everyone()
    _phase("save")
    phase("saving")
    path = save_final(run) if run.main else None
    _phase("done")
    if run.best_val_loss and run.main:  # the last line: where to look for the best checkpoint
        log.info("lowest validation loss %.5f at step %d (of %d)", *run.best_val_loss, run.max_steps)
    run.accelerator.end_training()
    return path


class Pace:
    """The measured time per optimizer step (its own time: sampling and checkpoints are not in it) and the time
    left at that pace, logged once after the first steps: STEPS of them, or fewer that took SECONDS."""
    STEPS, SECONDS = 3, 10.0

    def __init__(self, main: bool):
        self.times, self.done = [], not main

    def add(self, seconds: float, left: int):
        self.times.append(seconds)
        if self.done or (len(self.times) < self.STEPS and sum(self.times) < self.SECONDS):
            return
        self.done = True
        if left:
            per = sum(self.times[1:] or self.times) / len(self.times[1:] or self.times)  # the first warms up
            log.info("pace: %.2f s/step over the first %d steps; about %s for the remaining %d steps (sampling and "
                     "checkpoints not counted)", per, len(self.times), _duration(per * left), left)


def _duration(seconds: float) -> str:
    """'2 h 05 min', '7 min 03 s', '12 s'."""
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _phase(name: str):
    """Mark where a run is, at debug level: benchmarks/train_step.py reads these to report memory and time per phase.
    A signal before "train" stops the run at once, from "train" on after the step it is on (interrupt.py)."""
    interrupt.entered(name)
    log.debug("phase: %s", name)


def _stop(run: Run, why: str) -> None:
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


def _val_loss_due(every: int | None, run: Run, epoch_before: int) -> bool:
    """Whether the validation loss is due after this step: every N steps, else at each epoch's end; always last."""
    if run.recipe.heldout is None:
        return False
    return run.step == run.max_steps or (run.step % every == 0 if every else run.epoch > epoch_before)


def validation_loss(run: Run) -> float | None:
    """The held-out loss (main process; the others wait and get None), tracking the lowest."""
    value = None
    if run.main:
        value = heldout.loss(run, lambda *a: _predict_loss(run, *a, bare=True))
        if run.best_val_loss is None or value < run.best_val_loss[0]:
            run.best_val_loss = [value, run.step]
    run.accelerator.wait_for_everyone()
    return value


# ---------------------------------------------------------------- set-up

def setup(config: TrainConfig, recipe: Recipe) -> Run:
    """Accelerator, seed and schedule, the checked checkpoint, frozen models and caches, LoRA, optimizer."""
    accelerator = _accelerator(config)
    main, device, world = accelerator.is_main_process, accelerator.device, accelerator.num_processes
    # Frozen weights in the compute precision; trainable LoRA weights always stay fp32 (see _trainable).
    weight_dtype = models.torch_dtype(accelerator.mixed_precision if accelerator.mixed_precision in ("fp16", "bf16")
                                      else "no")
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # The checkpoint is read whole and checked against this run's settings before any model loads.
    ckpt = _find_checkpoint(config, main)
    seed = _seed(config, ckpt, world)
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
    settings = run_settings(config, recipe, world, max_steps, lr)
    if config.lora_type == "adalora":  # a schedule with no room to prune fails here, before any model loads
        settings["adalora"] = list(adalora_schedule(config, max_steps)) + [config.adalora_delta_t]
    if ckpt:
        _check_resume(config, ckpt, settings, main)

    _phase("load text encoders and VAE")
    load = dict(revision=config.revision, cache_dir=config.cache_dir)
    frozen = dict(load, variant=config.variant, allow_pickle=config.allow_pickle, dtype=weight_dtype)
    names = conditioning.text_encoder_names(config.family)
    tokenizers = [models.load_tokenizer(config.base, **load, subfolder=n.replace("text_encoder", "tokenizer"))
                  for n in names]
    noise_scheduler = _noise_scheduler(config, main)
    text_encoders = {n: models.load_text_encoder(config.base, **frozen, subfolder=n).to(device).requires_grad_(False)
                     for n in names}
    vae, vae_dtype = _vae(config, frozen, weight_dtype)
    vae = vae.to(device).requires_grad_(False)
    vae_scale = vae.config.scaling_factor

    # Encode once, then the VAE / text encoder leave the training device.
    _phase("cache")
    caches, (cache_latents, cache_text, why_not) = Caches(), plan(config, recipe.data)
    store = diskcache.LatentStore(config.latents_cache_dir, diskcache.vae_id(vae)) \
        if cache_latents and config.cache_latents_to_disk else None
    # On disk, the main process encodes first and the others find its entries.
    with accelerator.main_process_first() if store else contextlib.nullcontext():
        if cache_latents:
            caches.build_latents(data, seed, vae, device, vae_dtype, config.train_batch_size, main, store)
    held = recipe.heldout and heldout.encode(recipe.heldout, vae, device, vae_dtype, config.train_batch_size)
    if cache_latents:
        vae = models.release(vae, device)
    if cache_text:
        caches.build_embeds(all_captions(data) + (heldout.captions(recipe.heldout) if held else []),
                            lambda texts: conditioning.encode(list(text_encoders.values()), tokenizers, texts,
                                                              recipe.max_length, recipe.use_attention_mask))
    if main:
        _log_buckets(data)
        what = [f"VAE latents of {len(caches)} images"] * cache_latents + \
               [f"text embeddings of {len(caches.caption_ids)} captions"] * cache_text
        log.info("cached %s%s", " and ".join(what) if what else "nothing", f" (not cached: {why_not})" if why_not else "")
        if store:
            log.info("latent cache: %d of %d images reused, %d encoded (%s)", caches.reused, len(caches),
                     caches.encoded, store.root)
        if held:
            log.info("validation loss on %d held-out images, %d fixed timesteps each", len(held),
                     heldout.TIMESTEPS)
    if cache_text:
        text_encoders = {n: models.release(te, device) for n, te in text_encoders.items()}

    _phase("load UNet")
    if config.quantize_base == "none":
        unet = models.load_unet(config.base, **frozen)
    else:  # before LoRA injection: peft wraps the quantized layers in its bnb LoRA layers
        unet, n = quantize.load_unet(config.base, config.quantize_base, device, **frozen)
        if main:
            log.info("quantized base: %d Linear layers of the UNet in %s (bitsandbytes); convolutions in %s",
                     n, config.quantize_base, str(weight_dtype).replace("torch.", ""))
    unet = unet.to(device)
    parts, optimizer, lr_scheduler = _trainable(config, accelerator, unet, text_encoders, lr, max_steps)
    best = ckpt.best_val_loss if ckpt else None
    if ckpt:
        checkpoint.apply(ckpt, {k: c.bare for k, c in parts.items()}, optimizer, lr_scheduler,
                         getattr(accelerator, "scaler", None))
        for k, c in parts.items():
            if c.tuner is not None:  # the rank allocator's scores and frozen ranks, for an exact resume
                adalora.load_state(c.tuner, ckpt.extra.get(k, {}))
        if main:
            log.info("resumed from %s at step %d", ckpt.path, step)
    if main:
        params = [p for c in parts.values() for p in c.params]
        note = models.precision_note(accelerator.mixed_precision, device, config.precision_chosen)
        log.info("precision: %s; LoRA parameters in %s, frozen weights in %s (mixed precision: %s)",
                 note, str(params[0].dtype).replace("torch.", ""),
                 str(weight_dtype).replace("torch.", ""), accelerator.mixed_precision)
        if config.report_to != "none":
            manifest.Manifest(config.output_dir).will_make(config.output_dir / config.logging_dir)
        accelerator.init_trackers("sdlora", config=config.tracker_config())
        log.info("training %s LoRA: %d rows, %d trainable params, %d steps (%d epochs), batch %d x %d accum x %d procs",
                 recipe.kind, len(recipe.data.rows), sum(p.numel() for p in params), max_steps, num_epochs,
                 config.train_batch_size, ga, world)
    batches = loader(recipe.data, seed, sampler, pixels=not cache_latents,
                     workers=0 if cache_latents else config.dataloader_num_workers)
    for c in parts.values():
        c.module.train()
    return Run(config=config, recipe=recipe, accelerator=accelerator, seed=seed, settings=settings,
               weight_dtype=weight_dtype, vae_dtype=vae_dtype, tokenizers=tokenizers, noise_scheduler=noise_scheduler,
               vae=vae, vae_scale=vae_scale, caches=caches,
               text_encoders={n: None if n in parts else te for n, te in text_encoders.items()},
               cache_latents=cache_latents, parts=parts, optimizer=optimizer, lr_scheduler=lr_scheduler,
               sampler=sampler, batches=iter(batches), max_steps=max_steps, num_epochs=num_epochs, step=step,
               heldout_cache=held, best_val_loss=best)


def total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """The optimizer steps a run makes: --max_train_steps, else its epochs' micro-batches over the accumulation."""
    return config.max_train_steps or math.ceil(config.num_train_epochs * batches_per_epoch /
                                               config.gradient_accumulation_steps)


def _noise_scheduler(config: TrainConfig, main: bool):
    """The base's noise schedule (DDPM), its prediction type overridden by --prediction_type, and rescaled to
    zero terminal SNR with --zero_terminal_snr; logged with the base's family."""
    sched = models.load_noise_scheduler(config.base, config.revision, config.cache_dir)
    own = sched.config.prediction_type
    if config.prediction_type:
        sched.register_to_config(prediction_type=config.prediction_type)
    if config.zero_terminal_snr:
        sched = type(sched).from_config(sched.config, rescale_betas_zero_snr=True)
    if main:  # the loss target follows the scheduler config (losses.target), as the base was trained
        override = f"; --prediction_type {config.prediction_type} overrides its scheduler's {own}" \
            if config.prediction_type and config.prediction_type != own else ""
        log.info("base model: %s%s", models.describe(config.family, sched.config.prediction_type), override)
        if config.zero_terminal_snr and sched.config.prediction_type != "v_prediction":
            log.warning("--zero_terminal_snr with %s prediction: at the last timestep there is no signal left to "
                        "predict noise from; it is meant for v-prediction (--prediction_type v_prediction)",
                        sched.config.prediction_type)
    return sched


def _vae(config: TrainConfig, frozen: dict, weight_dtype):
    """(the VAE, the dtype it encodes in): --pretrained_vae_model_name_or_path or the base's. SDXL's own VAE
    overflows in fp16 (its config says force_upcast), so it stays fp32 there, as in diffusers' SDXL scripts."""
    maybe_upcast = config.family == "sdxl" and weight_dtype == torch.float16
    vae = models.load_vae(config.base, **{**frozen, "dtype": torch.float32 if maybe_upcast else weight_dtype},
                          vae=config.pretrained_vae_model_name_or_path)
    if maybe_upcast and not vae.config.get("force_upcast", True):  # an fp16-safe VAE (the fp16-fix one)
        vae = vae.to(weight_dtype)
    return vae, vae.dtype


def _log_buckets(data: TrainSet):
    """The bucket table and how much of the images it keeps, against a square crop."""
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


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = config.output_dir
    return Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / config.logging_dir)),
        # Without a GPU, `accelerate launch --num_processes N` must still mean N gloo processes.
        cpu=not torch.cuda.is_available(),
    )


def _find_checkpoint(config: TrainConfig, main: bool):
    if not config.resume_from_checkpoint:
        return None
    found = checkpoint.find(config.output_dir, config.resume_from_checkpoint)
    if found is None:
        if main:
            log.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run", config.output_dir)
        return None
    return checkpoint.read(found, _trained(config))


def _trained(config: TrainConfig) -> list[str]:
    """The models a run puts LoRA on: the UNet, and with --train_text_encoder every text encoder."""
    return ["unet"] + list(conditioning.text_encoder_names(config.family)) * config.train_text_encoder


def _seed(config: TrainConfig, ckpt, world: int) -> int:
    """The seed drives every random choice; a resumed run takes the one it started with."""
    seed = ckpt.seed if ckpt else (config.seed if config.seed is not None else random.SystemRandom().randrange(2**31))
    if world > 1:  # one seed for all processes, or each would shard a different shuffle
        from accelerate.utils import broadcast_object_list

        seed = broadcast_object_list([seed])[0]
    return seed


# LR schedules whose value at step s depends on the total number of steps.
_DECAYING = {"linear", "cosine", "cosine_with_restarts", "polynomial"}


def run_settings(config: TrainConfig, recipe: Recipe, world: int, max_steps: int, lr: float) -> dict:
    """Everything that must be the same for a resumed run to continue the one that wrote the checkpoint."""
    base = config.base_name
    if Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())
    c = config
    s = {
        "base_model": base, "revision": c.revision, "variant": c.variant,
        "rank": c.rank, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout, "use_rslora": c.use_rslora,
        "init_lora_weights": c.init_lora_weights, "lora_type": c.lora_type,
        "target_modules": list(c.target_modules), "train_text_encoder": c.train_text_encoder,
        "learning_rate": lr, "text_encoder_lr": c.text_encoder_lr or lr, "lr_scheduler": c.lr_scheduler,
        "lr_warmup_steps": c.lr_warmup_steps, "lr_num_cycles": c.lr_num_cycles, "lr_power": c.lr_power,
        "use_8bit_adam": c.use_8bit_adam, "adam_beta1": c.adam_beta1, "adam_beta2": c.adam_beta2,
        "adam_weight_decay": c.adam_weight_decay, "adam_epsilon": c.adam_epsilon, "max_grad_norm": c.max_grad_norm,
        "train_batch_size": c.train_batch_size, "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "num_processes": world, "resolution": c.resolution, "center_crop": c.center_crop,
        "random_flip": c.random_flip, "noise_offset": c.noise_offset, "snr_gamma": c.snr_gamma,
        "prediction_type": c.prediction_type, "loss_weights": recipe.group_weights,
        "tokenizer_max_length": recipe.max_length, "text_encoder_use_attention_mask": recipe.use_attention_mask,
        "num_rows": len(recipe.data.rows), "data": recipe.data.digest(), "bucketing": asdict(c.bucketing),
        "masked_loss": c.masked_loss,
        "captions": asdict(recipe.data.caption_ops) if recipe.data.caption_ops else None,
    }
    if c.lr_scheduler in _DECAYING:
        s["max_train_steps"] = max_steps
    for k, default in _OPTIONAL_SETTINGS.items():
        if getattr(c, k) != default:  # only when used: a checkpoint from before these flags matches a run without
            s[k] = getattr(c, k)
    vae = s.get("pretrained_vae_model_name_or_path")
    if vae and Path(vae).expanduser().exists():  # a local VAE folder, wherever the run is resumed from
        s["pretrained_vae_model_name_or_path"] = str(Path(vae).expanduser().resolve())
    return s


# Settings recorded only when they differ from these defaults (a missing one means the default, see _check_resume).
_OPTIONAL_SETTINGS = {"pretrained_vae_model_name_or_path": None, "zero_terminal_snr": False,
                      "adam_weight_decay_text_encoder": None, "quantize_base": "none"}


def _check_resume(config: TrainConfig, ckpt, settings: dict, main: bool):
    saved = {**_OPTIONAL_SETTINGS, **ckpt.settings}
    changed, unknown = checkpoint.differences(saved, {**_OPTIONAL_SETTINGS, **settings})
    if config.seed is not None and config.seed != ckpt.seed:
        changed.append(f"seed {ckpt.seed} -> {config.seed}")
    if changed:
        raise UserError(f"--resume_from_checkpoint {ckpt.path}: this run's settings differ from the checkpoint's "
                        f"({'; '.join(changed)}); resume with the same settings, or start a new run in another "
                        f"--output_dir")
    if unknown and main:
        log.warning("%s predates the settings check: %s not verified", ckpt.path, ", ".join(unknown))


def _trainable(config: TrainConfig, accelerator, unet, text_encoders: dict, lr: float, max_steps: int):
    """LoRA on the UNet (and text encoders), fp32 LoRA weights, the optimizer and LR schedule, prepared."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    trained = {"unet": (unet, config.target_modules)}
    for n in _trained(config)[1:]:
        layers = text_encoders[n].config.num_hidden_layers
        trained[n] = (text_encoders[n], inject.text_encoder_targets(
            layers, conditioning.layers_used(n, config.family, layers)))
    configs, params, initial, tuners = {}, {}, {}, {}
    for name, (model, targets) in trained.items():  # the UNet first: LoRA init draws from the seeded RNG
        if config.lora_type == "adalora":  # peft's tuner object is kept: its rank allocator runs every step
            init_r, tinit, tfinal = adalora_schedule(config, max_steps)
            configs[name] = adalora.config(config.rank, config.lora_alpha, list(targets), config.lora_dropout, init_r,
                                           max_steps, tinit, tfinal, config.adalora_delta_t)
            tuners[name], params[name] = adalora.attach(model, configs[name])
            continue
        configs[name] = inject.lora_config(config.rank, config.lora_alpha, list(targets), config.lora_dropout,
                                           config.use_rslora, config.init_lora_weights, config.lora_type == "dora",
                                           config.lora_type)
        params[name] = inject.add_lora(model, configs[name])
        if config.init_lora_weights != "gaussian":  # before a resume loads the checkpoint's weights over them
            initial[name] = inject.initial_weights(model)
    # fp32 master weights for the LoRA parameters whatever the mixed precision: fp16 trainable
    # weights are what makes GradScaler fail with "Attempting to unscale FP16 gradients".
    cast_training_params([m for m, _ in trained.values()], dtype=torch.float32)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for name, (model, _) in trained.items():
            if name != "unet":
                model.gradient_checkpointing_enable()
    if config.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    te_decay = config.adam_weight_decay if config.adam_weight_decay_text_encoder is None \
        else config.adam_weight_decay_text_encoder
    groups = [{"params": params["unet"], "lr": lr}] + [
        {"params": params[n], "lr": config.text_encoder_lr or lr, "weight_decay": te_decay} for n in params if n != "unet"]
    kw = dict(betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
              eps=config.adam_epsilon)
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups, **kw)
    else:
        optimizer = torch.optim.AdamW(groups, **kw)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=config.lr_num_cycles, power=config.lr_power)
    prepared = accelerator.prepare(*[m for m, _ in trained.values()], optimizer)
    parts = {name: Component(configs[name], module, accelerator.unwrap_model(module), params[name], initial.get(name),
                             tuners.get(name)) for name, module in zip(trained, prepared[:-1])}
    if config.compile:  # training steps only: sampling and the held-out loss run the bare UNet uncompiled
        parts["unet"].module = torch.compile(parts["unet"].module)
    return parts, prepared[-1], lr_scheduler


# ---------------------------------------------------------------- steps

def micro_step(run: Run, batch: dict, micro: int):
    """Loss of one micro-batch (total, and per loss group); all randomness from (seed, micro, process).
    The UNet runs once per chunk of rows of one bucket (one chunk, except for DreamBooth instance photos
    whose bucket differs from the class images')."""
    device, gen = run.accelerator.device, _step_generator(run.seed, micro, run.accelerator.process_index)
    # the global RNG (LoRA dropout) replays on resume too
    torch.manual_seed(_step_seed(run.seed, micro, run.accelerator.process_index) + 1)
    per_sample = []
    for c, (s, e) in enumerate(batch["chunks"]):
        if run.cache_latents:
            posterior, mask = run.caches.latent_batch(batch["row_ids"][s:e].tolist())
        else:
            with torch.no_grad():
                posterior = run.vae.encode(batch["pixel_values"][c].to(device, run.vae_dtype)).latent_dist.parameters
            posterior, mask = posterior.float().cpu(), batch["masks"][c]
            mask = None if mask is None else latent_mask(mask, posterior.shape[-2:])
        per_sample.append(_denoising_loss(run, posterior, mask, batch["captions"][s:e], batch["geometry"][s:e], gen))
    return losses.group_loss(torch.cat(per_sample), batch["groups"].to(device), run.recipe.group_weights)


def _denoising_loss(run: Run, posterior: torch.Tensor, mask, captions: list[str], geometry, gen) -> torch.Tensor:
    """Per-sample loss of rows of one size: sample a latent, noise it at a random timestep, predict."""
    device = run.accelerator.device
    # One sample of the VAE posterior (mean | logvar), as latent_dist.sample() draws it, from our generator.
    mean, logvar = posterior.chunk(2, dim=1)
    lat = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape, generator=gen)
    lat = (lat * run.vae_scale).to(device)
    noise = torch.randn(lat.shape, generator=gen)
    if run.config.noise_offset:
        noise += run.config.noise_offset * torch.randn((lat.shape[0], lat.shape[1], 1, 1), generator=gen)
    noise = noise.to(device)
    sched = run.noise_scheduler
    t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],), generator=gen).to(device)
    return _predict_loss(run, lat, noise, t, captions, geometry, None if mask is None else mask.to(device))


def _predict_loss(run: Run, lat, noise, t, captions: list[str], geometry, mask, bare: bool = False) -> torch.Tensor:
    """The UNet's per-sample loss on `lat` noised with `noise` at timesteps `t`; `geometry`: each row's size
    and crop (SDXL's time ids). `bare`: the models without their DDP wrapper (the held-out loss runs on the
    main process alone)."""
    device, sched, dtype = run.accelerator.device, run.noise_scheduler, run.weight_dtype
    noisy = sched.add_noise(lat, noise, t)
    if run.caches.embeds is not None:
        text = run.caches.embeddings(captions)
    else:
        text = conditioning.encode(run.encoders(bare), run.tokenizers, captions, run.recipe.max_length,
                                   run.recipe.use_attention_mask)
    unet = run.parts["unet"].bare if bare else run.parts["unet"].module
    with run.accelerator.autocast():
        pred = unet(noisy.to(dtype), t, text.embeds.to(device, dtype), return_dict=False,
                    **conditioning.unet_kwargs(text, geometry, device, dtype))[0]
    return losses.per_sample_loss(pred, losses.target(sched, lat, noise, t), sched, t, run.config.snr_gamma, mask)


def optimizer_step(run: Run) -> dict:
    """`gradient_accumulation_steps` micro-steps, clipping, one optimizer and LR step; returns the logs."""
    acc, ga = run.accelerator, run.config.gradient_accumulation_steps
    logs: dict[str, float] = {}
    for k in range(ga):
        batch = next(run.batches)
        with contextlib.ExitStack() as ctx:
            if k < ga - 1 and acc.num_processes > 1:  # skip the all-reduce until the last micro-batch
                for c in run.parts.values():
                    ctx.enter_context(acc.no_sync(c.module))
            loss, parts = micro_step(run, batch, run.step * ga + k)
            # AdaLoRA's orthogonality regulariser (peft adds it only to a `.loss` output, which a UNet has not)
            reg = sum(adalora.penalty(c.tuner) for c in run.parts.values() if c.tuner is not None)
            acc.backward((loss + reg) / ga)
        logs["loss"] = logs.get("loss", 0.0) + loss.item() / ga
        for g, v in parts.items():
            name = run.recipe.group_names.get(g, f"loss_{g}")
            if name != "loss":
                logs[name] = logs.get(name, 0.0) + v.item() / ga
    if run.config.max_grad_norm and run.config.max_grad_norm > 0:
        params = [p for c in run.parts.values() for p in c.params]
        logs["grad_norm"] = float(acc.clip_grad_norm_(params, run.config.max_grad_norm))
    run.optimizer.step()
    if not acc.optimizer_step_was_skipped:  # fp16 overflow: GradScaler skipped the step
        run.lr_scheduler.step()
    tuners = [c.tuner for c in run.parts.values() if c.tuner is not None]
    if tuners:  # AdaLoRA scores each rank by |weight * grad|: after the step, before the gradients are cleared
        logs["adalora_ranks"] = sum(adalora.update(t, run.step) for t in tuners)
        _log_ranks(run, logs["adalora_ranks"])
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    if acc.num_processes > 1:  # log the mean over processes, not just the main one's share of the batch
        keys = sorted(logs)
        vals = acc.reduce(torch.tensor([logs[k] for k in keys], device=acc.device), "mean")
        logs = dict(zip(keys, vals.tolist()))
    return {**logs, "lr": run.lr_scheduler.get_last_lr()[0]}


def _log_ranks(run: Run, active: int):
    """AdaLoRA's shrinking budget: at each tenth of the run, and when the ranks are frozen."""
    frozen = run.step == run.max_steps - run.settings["adalora"][2]
    if run.main and (frozen or (run.step + 1) % max(1, run.max_steps // 10) == 0):
        total = sum(adalora.initial_ranks(c.bare) for c in run.parts.values() if c.tuner is not None)
        log.info("AdaLoRA step %d: %d of %d ranks active%s", run.step + 1, active, total,
                 " (final ranks from here on)" if frozen else "")


def check_finite(run: Run, logs: dict):
    """Stop at the first step whose LoRA weights are NaN/Inf: nothing of it is saved, so the last checkpoint and
    any earlier output stay the last good ones (a diverged LoRA would only draw black images)."""
    if all(torch.isfinite(p).all() for c in run.parts.values() for p in c.params):
        return
    done = checkpoint.list_checkpoints(run.config.output_dir)
    raise UserError(f"training diverged at step {run.step}: the LoRA weights became NaN/Inf (loss {logs['loss']:.4g}); "
                    f"nothing of this step was saved{f', the last checkpoint is {done[-1].name}' if done else ''} — "
                    f"lower --learning_rate, or use --mixed_precision bf16 or no instead of fp16")


def _step_seed(seed: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + micro * 7919 + rank * 104_729) % (2**62)


def _step_generator(seed: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(_step_seed(seed, micro, rank))


# ---------------------------------------------------------------- saving

def save_checkpoint(run: Run, announce: bool = True) -> Path | None:
    run.accelerator.wait_for_everyone()
    path = None
    if run.main:
        path = checkpoint.save(run.config.output_dir, run.step, {k: c.bare for k, c in run.parts.items()},
                               run.optimizer, run.lr_scheduler, getattr(run.accelerator, "scaler", None), run.seed,
                               run.settings, run.config.checkpoints_total_limit, run.best_val_loss,
                               {k: adalora.state(c.tuner) for k, c in run.parts.items() if c.tuner is not None})
        if path and announce:
            log.info("saved %s", path)
    return path


def _public_name(model: str) -> str:
    """A Hub id as given; a local folder by its name (a card or header must not carry a local path)."""
    return Path(model).expanduser().resolve().name if Path(model).expanduser().exists() else model


def save_final(run: Run) -> Path:
    """The LoRA files (diffusers', and kohya's for ComfyUI/A1111), their header and the model card (main process)."""
    c, recipe = run.config, run.recipe
    base = c.base_name
    # The Hub validates base_model as a repo id, and a pushed card or header must not carry a local path.
    local_base = Path(base).expanduser().exists() and base not in models.BUNDLED
    if c.push_to_hub and local_base:
        log.warning("model card: base_model left out of the front matter (%s is a local path, not a Hub id)", base)
        base = Path(base).expanduser().resolve().name
    unet_config = run.parts["unet"].bare.config
    kohya_file = c.output_dir / weights.kohya_name(c.output_dir)
    repeated = sum(r.repeats > 1 for r in recipe.data.rows)
    info = {
        "base_model": base, "base_model_in_front_matter": not (c.push_to_hub and local_base),
        "base_is_local": local_base, "kind": recipe.kind,
        **dict(zip(("rank", "alpha"), inject.file_rank_alpha(c.rank, c.lora_alpha, c.use_rslora,
                                                             c.init_lora_weights != "gaussian"))),
        "rslora": c.use_rslora or None, "lora_type": c.lora_type,
        "init": c.init_lora_weights if c.init_lora_weights != "gaussian" else None,
        "target_modules": list(c.target_modules), "train_text_encoder": c.train_text_encoder, "steps": run.step,
        "epochs": run.num_epochs, "train_batch_size": c.train_batch_size,
        "gradient_accumulation_steps": c.gradient_accumulation_steps, "learning_rate": c.learning_rate,
        "lr_scheduler": c.lr_scheduler, "resolution": c.resolution, "mixed_precision": run.accelerator.mixed_precision,
        "save_precision": c.save_precision, "seed": run.seed, "dataset": recipe.dataset_desc,
        "num_images": len(recipe.data.rows), "samples": run.samples,
        "repo_id": c.hub_model_id if c.push_to_hub else None, "extra_tags": recipe.extra_tags,
        "example_prompt": c.validation_prompt or recipe.trigger_phrase, "trigger_phrase": recipe.trigger_phrase,
        "title": c.output_dir.resolve().name, "kohya_file": kohya_file.name,
        "architecture": models.architecture(unet_config, run.noise_scheduler.config.prediction_type, c.family),
        "prediction_type": run.noise_scheduler.config.prediction_type,
        "family": models.describe(c.family, run.noise_scheduler.config.prediction_type),
        "buckets": _bucket_summary(recipe.data), "masked_loss": c.masked_loss or None,
        "caption_ops": recipe.data.caption_ops.describe() if recipe.data.caption_ops else None,
        "dataset_dirs": _dataset_dirs(recipe),
        "repeat_folders": repeated and f"{repeated} images in N_name folders ({len(recipe.data)} examples per epoch)",
        "vae": c.pretrained_vae_model_name_or_path and _public_name(c.pretrained_vae_model_name_or_path),
        "zero_terminal_snr": c.zero_terminal_snr or None,
        "quantize_base": c.quantize_base if c.quantize_base != "none" else None,
        "best_val_loss": (f"{run.best_val_loss[0]:.5f} at step {run.best_val_loss[1]} "
                          f"({len(recipe.heldout.used_rows())} held-out images)") if run.best_val_loss else None,
    }
    path = c.output_dir / WEIGHTS_NAME
    record, written = manifest.Manifest(c.output_dir), (WEIGHTS_NAME, kohya_file.name, "README.md")
    record.will_write(*written)  # only sdlora's own files are replaced
    sd, meta = weights.save(path, {k: (p.bare, p.lora_config, p.initial) for k, p in run.parts.items()}, info,
                            models.torch_dtype(c.save_precision))
    weights.save_kohya(kohya_file, sd, meta)
    if c.lora_type == "adalora":
        ranks = [v.shape[0] for k, v in sd.items() if k.endswith((".lora_A.weight", ".lora_linear_layer.down.weight"))]
        total = sum(adalora.initial_ranks(p.bare) for p in run.parts.values())
        log.info("AdaLoRA: saved %d layers at their final ranks (%d to %d, %d in all, from %d); %d layers pruned to "
                 "rank 0 left out", len(ranks), min(ranks), max(ranks), sum(ranks), total,
                 sum(1 for p in run.parts.values() for _ in adalora.layers(p.bare)) - len(ranks))
    if c.lora_type == "dora":
        log.warning("DoRA: %s holds LyCORIS's per-output-channel dora_scale, which LyCORIS applies exactly and "
                    "ComfyUI/Forge closely; A1111's built-in loader reads dora_scale per input channel and gets it "
                    "wrong, and diffusers drops it (it warns). diffusers applies %s exactly, sdlora both files",
                    kohya_file.name, path.name)
    modelcard.write(c.output_dir, info, recipe.card_front, recipe.card_settings)
    record.wrote(*written)
    reader = "for sdlora's loader: diffusers cannot read LoHa/LoKr" if c.lora_type in ("loha", "lokr") else "for diffusers"
    log.info("saved %s (%d tensors, %d parameters, %.2f MB; %s), %s (the same LoRA for ComfyUI, "
             "A1111/Forge and kohya's tools) and README.md", path, len(sd), inject.count_params(sd),
             path.stat().st_size / 1e6, reader, kohya_file.name)
    for f in (path, kohya_file):  # which loader applies which file whole (sdlora inspect's table, in one line each)
        log.info("%s: %s", f.name, loaders.where(loaders.read_file(f, formats.load_lora(f))))
    return path
