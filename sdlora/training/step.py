"""One optimizer step: its micro-batches' denoising loss, the backward pass, clipping and the update.

Reproducibility contract: every random number of step s (data order, augmentation, VAE sample, noise,
timesteps) is a pure function of (seed, s, process), so a resumed run replays exactly what an
uninterrupted one would have done.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ..errors import UserError
from ..lora import adalora
from . import checkpoint, conditioning, ema, losses, sd3run
from . import noise as noise_ops
from .caches import latent_mask
from .run import Run

log = logging.getLogger("sdlora")


def micro_step(run: Run, batch: dict, micro: int):
    """Loss of one micro-batch (total, and per loss group); all randomness from (seed, micro, process).
    The UNet runs once per chunk of rows of one bucket (one chunk, except for DreamBooth instance photos
    whose bucket differs from the class images')."""
    device, gen = run.accelerator.device, _step_generator(run.seed, micro, run.accelerator.process_index)
    # the global RNG (LoRA dropout) replays on resume too
    torch.manual_seed(_step_seed(run.seed, micro, run.accelerator.process_index) + 1)
    per_sample = []
    for c, (s, e) in enumerate(batch["chunks"]):
        if run.frozen.latents_cached:
            posterior, mask = run.caches.latent_batch(batch["row_ids"][s:e].tolist())
        else:
            with torch.no_grad():
                posterior = run.frozen.vae.encode(batch["pixel_values"][c].to(device, run.frozen.vae_dtype)).latent_dist.parameters
            posterior, mask = posterior.float().cpu(), batch["masks"][c]
            mask = None if mask is None else latent_mask(mask, posterior.shape[-2:])
        per_sample.append(_denoising_loss(run, posterior, mask, batch["captions"][s:e], batch["geometry"][s:e], gen))
    return losses.group_loss(torch.cat(per_sample), batch["groups"].to(device), run.recipe.group_weights)


def _denoising_loss(run: Run, posterior: torch.Tensor, mask, captions: list[str], geometry, gen) -> torch.Tensor:
    """Per-sample loss of rows of one size: sample a latent, noise it at a random timestep, predict."""
    if run.config.family == "sd3":  # rectified flow on the MMDiT (sd3run.py, flow.py)
        return sd3run.loss(run, posterior, mask, captions, gen)
    device = run.accelerator.device
    # One sample of the VAE posterior (mean | logvar), as latent_dist.sample() draws it, from our generator.
    mean, logvar = posterior.chunk(2, dim=1)
    lat = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape, generator=gen)
    lat = (lat * run.frozen.vae_scale).to(device)
    noise = torch.randn(lat.shape, generator=gen)
    c, sched = run.config, run.frozen.noise_scheduler
    if c.noise_offset:
        noise += c.noise_offset * torch.randn((lat.shape[0], lat.shape[1], 1, 1), generator=gen)
    if c.multires_noise_iterations:
        noise = noise_ops.multires(noise, c.multires_noise_iterations, c.multires_noise_discount, gen)
    t = noise_ops.timesteps(lat.shape[0], sched.config.num_train_timesteps, c.min_timestep, c.max_timestep, gen)
    noised = noise_ops.perturbed(noise, c.ip_noise_gamma, c.ip_noise_gamma_random_strength, gen)
    return predict_loss(run, lat, noise.to(device), t.to(device), captions, geometry,
                        None if mask is None else mask.to(device),
                        noised=None if noised is noise else noised.to(device))


def predict_loss(run: Run, lat, noise, t, captions: list[str], geometry, mask, bare: bool = False,
                 noised=None) -> torch.Tensor:
    """The UNet's per-sample loss on `lat` noised with `noise` at timesteps `t` (with `noised` instead where given:
    input perturbation); `geometry`: each row's size and crop (SDXL's time ids). `bare`: the models without their
    DDP wrapper (the held-out loss runs on the main process alone)."""
    device, sched, dtype = run.accelerator.device, run.frozen.noise_scheduler, run.weight_dtype
    noisy = sched.add_noise(lat, noise if noised is None else noised, t)
    if run.caches.embeds is not None:
        text = run.caches.embeddings(captions)
    else:
        text = conditioning.encode(run.encoders(bare), run.frozen.tokenizers, captions, run.recipe.max_length,
                                   run.recipe.use_attention_mask, run.config.clip_skip)
    unet = run.parts["unet"].bare if bare else run.parts["unet"].module
    with run.accelerator.autocast():
        pred = unet(noisy.to(dtype), t, text.embeds.to(device, dtype), return_dict=False,
                    **conditioning.unet_kwargs(text, geometry, device, dtype))[0]
    return losses.per_sample_loss(pred, losses.target(sched, lat, noise, t), sched, t, run.config.snr_gamma, mask,
                                  run.config)


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
        if run.ema is not None:
            run.ema.step(ema.params(run.parts))
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
