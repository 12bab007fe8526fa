"""The one training loop, shared by the text-to-image and DreamBooth recipes.

A recipe hands over a `Recipe` (run.py: a TrainSet of rows grouped into examples, each row tagged with a loss
group; per-group loss weights; model-card facts) and the checked `TrainConfig`; `train` reads top to bottom:
`setup` builds one `Run` (setup.py), then each `optimizer_step` (step.py) is `accumulation` micro-steps, with
the validation loss, checkpoints and samples when they are due, and the LoRA files at the end (saving.py).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from . import earlystop, ema, heldout, optimizers, samples, validation
from .config import TrainConfig
from .hooks import Hooks
from .run import Recipe, Run
from .saving import save_beside, save_checkpoint, save_final, save_stopped
from .setup import mark, setup
from .step import check_finite, optimizer_step, predict_loss

log = logging.getLogger("sdlora")


def train(config: TrainConfig, recipe: Recipe, hooks: Hooks | None = None) -> Path | None:
    """Train and save; returns the weights file (None on other processes than the main one, and after a stop).
    `hooks` (hooks.py) follow the run step by step and can stop it: a stop saves a checkpoint at the step the
    run is on, so `--resume_from_checkpoint latest` continues it exactly (Ctrl+C and SIGTERM through
    cli.run.run, the UI's Stop)."""
    hooks = hooks or Hooks()
    phase = _phases(hooks.on_phase)
    run = setup(config, recipe, hooks)
    if config.sample_prompts and config.sample_at_first:
        phase("sampling")
        _sample_round(run)
    if recipe.heldout and run.step == 0:  # where the validation loss starts, before any training
        phase("validating")
        if (v := validation_loss(run)) is not None:
            log.info("validation loss before training: %.5f", v)
            run.accelerator.log({"val_loss": v}, step=0)
    mark("train")
    stopped = _steps(run, hooks, phase)
    if stopped:  # after the bar has ended its line
        phase("saving")
        return save_stopped(run, stopped)
    run.accelerator.wait_for_everyone()
    mark("save")
    phase("saving")
    path = save_output(run) if run.main else None
    mark("done")
    if run.best_val_loss and run.main:  # the last line: where to look for the best checkpoint
        log.info("lowest validation loss %.5f at step %d (of %d)", *run.best_val_loss, run.max_steps)
    _finish(run)
    return path


def _finish(run: Run) -> None:
    """End the trackers and the process group, with the DDP-wrapped models freed first. Freed after the group
    is destroyed, a DDP module tears the gloo group down in its own destructor, which joins the group's worker
    thread while holding the GIL: a worker still finishing the last barrier (it needs the GIL) hangs that process
    for ever (seen once, 2 CPU processes under load, accelerate 1.0). Freed before, the group is shut down by
    destroy_process_group, which waits for pending work first."""
    accelerator = run.accelerator
    run.parts.clear()
    accelerator.free_memory()
    accelerator.end_training()


def _phases(on_phase):
    """`phase(name)`: tell `on_phase` when the run turns to another phase (once per change)."""
    doing = [None]

    def phase(name: str):
        if on_phase and doing[0] != name:
            doing[0] = name
            on_phase(name)
    return phase


def _steps(run: Run, hooks: Hooks, phase) -> str | None:
    """Optimizer steps until the last one or a stop; returns why it stopped early (None: it did not)."""
    from tqdm.auto import tqdm

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
            early = False
            if _val_loss_due(run.config.validation_loss_steps, run, epoch_before):
                phase("validating")
                if (v := validation_loss(run)) is not None:
                    logs["val_loss"] = v
                early = run.early_stop is not None and run.early_stop.due(run.accelerator)
            run.accelerator.log(logs, step=run.step)
            if hooks.on_step:
                hooks.on_step(run.step, dict(logs, max_steps=run.max_steps))
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}",
                            **({"val_loss": f"{logs['val_loss']:.4f}"} if "val_loss" in logs else {}))
            _after_step(run, phase, epoch_before)
            if early and run.step < run.max_steps:
                if run.main:
                    log.info("early stopping at step %d: no lower validation loss in %d evaluations since step %d",
                             run.step, run.early_stop.patience, run.best_val_loss[1])
                return None
            if hooks.should_stop and (why := hooks.should_stop()) and run.step < run.max_steps:
                return why if isinstance(why, str) else "stopped"
    return None


def _after_step(run: Run, phase, epoch_before: int):
    """What is due after a step: a checkpoint, validation images, a round of sample prompts."""
    config = run.config
    if config.checkpointing_steps and run.step % config.checkpointing_steps == 0:
        phase("saving")
        save_checkpoint(run)
    new_epoch = run.epoch > epoch_before and run.epoch % config.validation_epochs == 0
    if config.validation_prompt and (new_epoch or run.step == run.max_steps):
        phase("sampling")
        if run.main:
            with evaluating(run):
                run.samples = validation.validate(_sampling(run), run.epoch)
        run.accelerator.wait_for_everyone()
    if samples.due(config, run.step, epoch_before, run.epoch, last=run.step == run.max_steps):
        phase("sampling")
        _sample_round(run)


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


def _val_loss_due(every: int | None, run: Run, epoch_before: int) -> bool:
    """Whether the validation loss is due after this step: every N steps, else at each epoch's end; always last."""
    if run.recipe.heldout is None:
        return False
    return run.step == run.max_steps or (run.step % every == 0 if every else run.epoch > epoch_before)


def validation_loss(run: Run) -> float | None:
    """The held-out loss (main process; the others wait and get None), tracking the lowest."""
    value = None
    if run.main:
        with evaluating(run):
            value = heldout.loss(run.recipe.heldout, run.heldout_cache, partial(predict_loss, run, bare=True),
                                 run.frozen.noise_scheduler.config.num_train_timesteps, run.frozen.vae_scale,
                                 run.accelerator.device, run.parts)
            improved = run.best_val_loss is None or value < run.best_val_loss[0]
            if run.early_stop is not None:  # with the weights just evaluated
                run.early_stop.record(improved, ema.params(run.parts))
        if improved:
            run.best_val_loss = [value, run.step]
    run.accelerator.wait_for_everyone()
    return value


@contextmanager
def evaluating(run: Run):
    """The weights to sample, validate and save with, for the time of a `with`: schedule-free's averaged ones
    (optimizers.evaluating), the EMA (--use_ema); the trained ones back afterwards."""
    with optimizers.evaluating(run.optimizer), ema.swapped_in(run.ema, run.parts):
        yield


def save_output(run: Run) -> Path:
    """The output from the weights to use; beside it the EMA run's raw weights, the early-stopped run's last ones
    (the output then holds the lowest validation loss's)."""
    with optimizers.evaluating(run.optimizer):
        if run.ema is not None:
            save_beside(run, ema.RAW_NAME, "the trained weights; the output holds their EMA")
        with ema.swapped_in(run.ema, run.parts):
            if run.early_stop is not None and run.early_stop.best is not None:
                save_beside(run, earlystop.LAST_NAME, f"the weights of the last step, {run.step}")
                run.early_stop.restore_best(ema.params(run.parts))
                log.info("the output holds the weights of step %d, the lowest validation loss", run.best_val_loss[1])
            return save_final(run)


def _sampling(run: Run) -> validation.Sampling:
    """What sampling with the run's LoRA as it is now takes."""
    return validation.Sampling(run.config, run.accelerator.device, run.weight_dtype, run.frozen, run.parts, run.seed,
                               run.recipe.max_length, run.recipe.use_attention_mask, run.accelerator.trackers)


def _sample_round(run: Run):
    """One round of --sample_prompts on the main process; the others wait for it."""
    if run.main:
        with evaluating(run):
            samples.write_round(_sampling(run), run.step)
    run.accelerator.wait_for_everyone()
