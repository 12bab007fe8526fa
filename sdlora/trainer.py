"""The one training loop, shared by the text-to-image and DreamBooth recipes.

A recipe hands over a `TrainSet` (rows grouped into examples, each row tagged with a loss
group) and per-group loss weights; everything else — caching, LoRA injection, mixed
precision, accumulation, clipping, checkpoints, validation, saving — happens here, once.

Reproducibility contract: every random number of step s (data order, augmentation, VAE
sample, noise, timesteps) is a pure function of (seed, s, process), so a resumed run
replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint, lora, modelcard, models, validation
from .data import StreamSampler, TrainSet, collate, has_random_transform
from .errors import UserError
from .io import save_safetensors

log = logging.getLogger("sdlora")
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


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


def group_loss(per_sample: torch.Tensor, groups: torch.Tensor, weights: dict[int, float]):
    """Σ_g w_g · mean(loss of rows in group g); also returns each group's mean for logging."""
    total, parts = per_sample.new_zeros(()), {}
    for g, w in weights.items():
        mask = groups == g
        if mask.any():
            parts[g] = per_sample[mask].mean()
            total = total + w * parts[g]
    return total, parts


def snr_weights(noise_scheduler, timesteps, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), as diffusers' scripts compute them."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    w = torch.clamp(snr, max=gamma) / snr
    if noise_scheduler.config.prediction_type == "v_prediction":
        w = torch.clamp(snr, max=gamma) / (snr + 1)
    return w


def _step_seed(seed: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + micro * 7919 + rank * 104_729) % (2**62)


def _step_generator(seed: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(_step_seed(seed, micro, rank))


class Caches:
    """VAE latent distributions per row and text embeddings per caption, computed once per run."""

    def __init__(self):
        self.latents: torch.Tensor | None = None  # [rows, 2C, h, w]: mean | logvar
        self.embeds: torch.Tensor | None = None
        self.caption_ids: dict[str, int] = {}

    @torch.no_grad()
    def build_latents(self, data: TrainSet, vae, device, dtype, batch: int, progress: bool):
        from tqdm.auto import tqdm

        out = []
        ids = list(range(len(data.rows)))
        for s in tqdm(range(0, len(ids), batch), desc="caching latents", disable=not progress):
            px = torch.stack([data.load_row(r, epoch=0) for r in ids[s:s + batch]]).to(device, dtype)
            out.append(vae.encode(px).latent_dist.parameters.float().cpu())
        self.latents = torch.cat(out)

    @torch.no_grad()
    def build_embeds(self, captions: list[str], text_encoder, tokenizer, max_length, use_mask, batch: int = 32):
        unique = sorted(set(captions))
        self.caption_ids = {c: i for i, c in enumerate(unique)}
        self.embeds = torch.cat([
            models.encode_prompts(text_encoder, tokenizer, unique[s:s + batch], max_length, use_mask).cpu()
            for s in range(0, len(unique), batch)
        ])


def all_captions(data: TrainSet) -> list[str]:
    caps = []
    for r in data.rows:
        caps += r.caption if isinstance(r.caption, list) else [r.caption]
    return caps


def data_digest(data: TrainSet) -> str:
    """A fingerprint of what is trained on: each image's file name and size, its caption, and how rows
    form examples and loss groups. Moving the folder keeps it; changing an image or caption does not."""
    rows = []
    for r in data.rows:
        size = r.image.stat().st_size if isinstance(r.image, Path) else None
        rows.append([Path(r.name).name if size is not None else r.name, size, r.caption])
    blob = json.dumps([rows, data.examples, data.groups], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


# LR schedules whose value at step s depends on the total number of steps.
_DECAYING = {"linear", "cosine", "cosine_with_restarts", "polynomial"}


def run_settings(args, recipe: Recipe, world: int, max_steps: int, lr: float, te_lr: float) -> dict:
    """Everything that must be the same for a resumed run to continue the one that wrote the checkpoint."""
    base = getattr(args, "base_model_name", args.pretrained_model_name_or_path)
    if Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())
    s = {
        "base_model": base, "revision": args.revision, "variant": args.variant,
        "rank": args.rank, "lora_alpha": args.lora_alpha if args.lora_alpha is not None else args.rank,
        "lora_dropout": args.lora_dropout, "target_modules": list(args.target_modules),
        "train_text_encoder": bool(args.train_text_encoder),
        "learning_rate": lr, "text_encoder_lr": te_lr, "lr_scheduler": args.lr_scheduler,
        "lr_warmup_steps": args.lr_warmup_steps, "lr_num_cycles": getattr(args, "lr_num_cycles", 1),
        "lr_power": getattr(args, "lr_power", 1.0), "use_8bit_adam": bool(args.use_8bit_adam),
        "adam_beta1": args.adam_beta1, "adam_beta2": args.adam_beta2, "adam_weight_decay": args.adam_weight_decay,
        "adam_epsilon": args.adam_epsilon, "max_grad_norm": args.max_grad_norm,
        "train_batch_size": args.train_batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": world, "resolution": args.resolution, "center_crop": bool(args.center_crop),
        "random_flip": bool(args.random_flip), "noise_offset": args.noise_offset, "snr_gamma": args.snr_gamma,
        "prediction_type": args.prediction_type, "loss_weights": recipe.group_weights,
        "tokenizer_max_length": recipe.max_length, "text_encoder_use_attention_mask": recipe.use_attention_mask,
        "num_rows": len(recipe.data.rows), "data": data_digest(recipe.data),
    }
    if args.lr_scheduler in _DECAYING:
        s["max_train_steps"] = max_steps
    return s


def train(args, recipe: Recipe, on_step=None) -> Path:
    """Train and save; `on_step(step, logs)` is called after every optimizer step (benchmarks use it)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    data = recipe.data
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        # Without a GPU, `accelerate launch --num_processes N` must still mean N gloo processes.
        cpu=not torch.cuda.is_available(),
    )
    main = accelerator.is_main_process
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    # Frozen weights in the compute precision; trainable LoRA weights always stay fp32 (see below).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- resume: the checkpoint is read and checked against this run's settings before any model loads
    ckpt = None
    if args.resume_from_checkpoint:
        found = checkpoint.find(output_dir, args.resume_from_checkpoint)
        if found is None and main:
            log.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run", output_dir)
        if found is not None:
            ckpt = checkpoint.read(found, ["unet"] + ["text_encoder"] * bool(args.train_text_encoder))
    # The seed drives every random choice; a resumed run takes the one it started with.
    seed = ckpt.seed if ckpt else (args.seed if args.seed is not None else random.SystemRandom().randrange(2**31))
    if world > 1:  # one seed for all processes, or each would shard a different shuffle
        from accelerate.utils import broadcast_object_list

        seed = broadcast_object_list([seed])[0]
    torch.manual_seed(seed)
    data.seed = seed

    # ---- schedule
    global_step = ckpt.step if ckpt else 0
    ga = args.gradient_accumulation_steps
    sampler = StreamSampler(len(data), args.train_batch_size, seed, rank, world, start=global_step * ga)
    # Epochs count micro-batches: the stream runs on across epoch boundaries, so N epochs are
    # ceil(N * batches / accumulation) optimizer steps, not N * ceil(batches / accumulation).
    max_steps = args.max_train_steps or math.ceil(args.num_train_epochs * sampler.batches_per_epoch / ga)
    num_epochs = math.ceil(max_steps * ga / sampler.batches_per_epoch)
    lr = args.learning_rate * (ga * args.train_batch_size * world if args.scale_lr else 1)
    te_lr = getattr(args, "text_encoder_lr", None) or lr
    settings = run_settings(args, recipe, world, max_steps, lr, te_lr)
    if ckpt:
        changed, unknown = checkpoint.differences(ckpt.settings, settings)
        if args.seed is not None and args.seed != ckpt.seed:
            changed.append(f"seed {ckpt.seed} -> {args.seed}")
        if changed:
            raise UserError(f"--resume_from_checkpoint {ckpt.path}: this run's settings differ from the checkpoint's "
                            f"({'; '.join(changed)}); resume with the same settings, or start a new run in another "
                            f"--output_dir")
        if unknown and main:
            log.warning("%s predates the settings check: %s not verified", ckpt.path, ", ".join(unknown))

    base = args.pretrained_model_name_or_path
    load_kw = dict(revision=args.revision, cache_dir=args.cache_dir)
    tokenizer = models.load_tokenizer(base, **load_kw)
    noise_scheduler = models.load_noise_scheduler(base, **load_kw)
    if args.prediction_type:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    model_kw = dict(load_kw, variant=args.variant, allow_pickle=args.allow_pickle)
    text_encoder = models.load_text_encoder(base, dtype=weight_dtype, **model_kw).to(device)
    text_encoder.requires_grad_(False)
    vae = models.load_vae(base, dtype=weight_dtype, **model_kw).to(device)
    vae.requires_grad_(False)
    vae_scale = vae.config.scaling_factor

    # ---- caches: encode once, then the VAE / text encoder leave the training device
    caches = Caches()
    cache_latents = not args.no_cache and not has_random_transform(data.rows, args.random_flip, args.center_crop)
    cache_text = (not args.no_cache or getattr(args, "pre_compute_text_embeddings", False)) and not args.train_text_encoder
    if cache_latents:
        caches.build_latents(data, vae, device, weight_dtype, args.train_batch_size, main)
        data.cached_latents = True
    if cache_text:
        caches.build_embeds(all_captions(data), text_encoder, tokenizer, recipe.max_length, recipe.use_attention_mask)
    if main:
        what = [f"VAE latents of {len(data.rows)} images"] * cache_latents + \
               [f"text embeddings of {len(caches.caption_ids)} captions"] * cache_text
        why_not = ["--no_cache"] * bool(args.no_cache) + \
                  ["random flip/crop changes the pixels every epoch"] * (not args.no_cache and not cache_latents) + \
                  ["the text encoder is being trained"] * bool(args.train_text_encoder)
        log.info("cached %s%s", " and ".join(what) if what else "nothing",
                 f" (not cached: {'; '.join(why_not)})" if why_not else "")
    released = []
    if cache_latents:
        vae = _release(vae, device)
        released.append("vae")
    if cache_text:
        text_encoder = _release(text_encoder, device)
        released.append("text_encoder")

    # ---- the model being trained
    unet = models.load_unet(base, dtype=weight_dtype, **model_kw).to(device)
    unet_cfg = lora.lora_config(args.rank, args.lora_alpha, args.target_modules, args.lora_dropout)
    params = {"unet": lora.add_lora(unet, unet_cfg)}
    trained = {"unet": unet}
    te_cfg = None
    if args.train_text_encoder:
        te_cfg = lora.lora_config(args.rank, args.lora_alpha, lora.TEXT_ENCODER_TARGETS, args.lora_dropout)
        params["text_encoder"] = lora.add_lora(text_encoder, te_cfg)
        trained["text_encoder"] = text_encoder
    # fp32 master weights for the LoRA parameters whatever the mixed precision: fp16 trainable
    # weights are what makes GradScaler fail with "Attempting to unscale FP16 gradients".
    cast_training_params(list(trained.values()), dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()

    # ---- optimizer
    groups = [{"params": params["unet"], "lr": lr}]
    if "text_encoder" in params:
        groups.append({"params": params["text_encoder"], "lr": te_lr})
    optimizer = _optimizer(args, groups)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=getattr(args, "lr_num_cycles", 1),
                                 power=getattr(args, "lr_power", 1.0))
    prepared = accelerator.prepare(*trained.values(), optimizer)
    wrapped = dict(zip(trained, prepared[:-1]))
    optimizer = prepared[-1]
    scaler = getattr(accelerator, "scaler", None)

    unwrapped = {k: accelerator.unwrap_model(m) for k, m in wrapped.items()}
    if ckpt:
        checkpoint.apply(ckpt, unwrapped, optimizer, lr_scheduler, scaler)
        if main:
            log.info("resumed from %s at step %d", ckpt.path, global_step)
        ckpt = None  # its tensors are in the models now

    if main:
        log.info("LoRA parameters in %s, frozen weights in %s (mixed precision: %s)",
                 str(next(iter(params["unet"])).dtype).replace("torch.", ""), str(weight_dtype).replace("torch.", ""),
                 accelerator.mixed_precision)
        accelerator.init_trackers("sdlora", config={k: v for k, v in vars(args).items()
                                                    if isinstance(v, (int, float, str, bool)) and k != "hub_token"})
        n_params = sum(p.numel() for ps in params.values() for p in ps)
        log.info("training %s LoRA: %d rows, %d trainable params, %d steps (%d epochs), batch %d x %d accum x %d procs",
                 recipe.kind, len(data.rows), n_params, max_steps, num_epochs, args.train_batch_size, ga, world)

    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=0 if cache_latents else args.dataloader_num_workers)
    batches = iter(loader)
    unet_ = wrapped["unet"]
    te_ = wrapped.get("text_encoder", text_encoder)
    for m in wrapped.values():
        m.train()

    def micro_step(batch, micro: int):
        gen = _step_generator(seed, micro, rank)
        torch.manual_seed(_step_seed(seed, micro, rank) + 1)  # the global RNG (LoRA dropout) replays on resume too
        if cache_latents:
            posterior = caches.latents[batch["row_ids"]]
        else:
            with torch.no_grad():
                posterior = vae.encode(batch["pixel_values"].to(device, weight_dtype)).latent_dist.parameters
            posterior = posterior.float().cpu()
        # One sample of the VAE posterior (mean | logvar), as latent_dist.sample() draws it, from our generator.
        mean, logvar = posterior.chunk(2, dim=1)
        lat = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape, generator=gen)
        lat = (lat * vae_scale).to(device)
        noise = torch.randn(lat.shape, generator=gen)
        if args.noise_offset:
            noise += args.noise_offset * torch.randn((lat.shape[0], lat.shape[1], 1, 1), generator=gen)
        noise = noise.to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (lat.shape[0],), generator=gen).to(device)
        noisy = noise_scheduler.add_noise(lat, noise, t)
        if cache_text:
            emb = caches.embeds[[caches.caption_ids[c] for c in batch["captions"]]].to(device)
        else:
            emb = models.encode_prompts(te_, tokenizer, batch["captions"], recipe.max_length, recipe.use_attention_mask)
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else noise_scheduler.get_velocity(lat, noise, t)
        with accelerator.autocast():
            pred = unet_(noisy.to(weight_dtype), t, emb.to(weight_dtype), return_dict=False)[0]
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if args.snr_gamma:
            per_sample = per_sample * snr_weights(noise_scheduler, t, args.snr_gamma).to(per_sample)
        return group_loss(per_sample, batch["groups"].to(device), recipe.group_weights)

    # `with`: the bar ends its line even when a save fails, so the error starts on a line of its own
    with tqdm(total=max_steps, initial=global_step, desc="steps", disable=not main, dynamic_ncols=True) as bar:
        samples: list[dict] = []
        t_last, last_logs = time.perf_counter(), {}
        while global_step < max_steps:
            epoch_before = (global_step * ga) // sampler.batches_per_epoch
            logs_acc: dict[str, float] = {}
            for k in range(ga):
                micro = global_step * ga + k
                batch = next(batches)
                sync = k == ga - 1
                with contextlib.ExitStack() as ctx:
                    if not sync and world > 1:  # skip the all-reduce until the last micro-batch
                        for m in wrapped.values():
                            ctx.enter_context(accelerator.no_sync(m))
                    loss, parts = micro_step(batch, micro)
                    accelerator.backward(loss / ga)
                logs_acc["loss"] = logs_acc.get("loss", 0.0) + loss.item() / ga
                for g, v in parts.items():
                    name = recipe.group_names.get(g, f"loss_{g}")
                    if name != "loss":
                        logs_acc[name] = logs_acc.get(name, 0.0) + v.item() / ga
            if args.max_grad_norm and args.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_([p for ps in params.values() for p in ps], args.max_grad_norm)
                logs_acc["grad_norm"] = float(grad_norm)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: GradScaler skipped the step
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1

            if world > 1:  # log the mean over processes, not just the main one's share of the batch
                keys = sorted(logs_acc)
                vals = accelerator.reduce(torch.tensor([logs_acc[k] for k in keys], device=device), "mean")
                logs_acc = dict(zip(keys, vals.tolist()))
            now = time.perf_counter()
            last_logs = {**logs_acc, "lr": lr_scheduler.get_last_lr()[0], "s_per_step": now - t_last}
            t_last = now
            accelerator.log(last_logs, step=global_step)
            if on_step:
                on_step(global_step, last_logs)
            bar.update(1)
            bar.set_postfix(loss=f"{last_logs['loss']:.4f}", lr=f"{last_logs['lr']:.2e}")

            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                accelerator.wait_for_everyone()
                if main:
                    path = checkpoint.save(output_dir, global_step, unwrapped, optimizer, lr_scheduler, scaler,
                                           seed, settings, args.checkpoints_total_limit)
                    log.info("saved %s", path)
            epoch_after = (global_step * ga) // sampler.batches_per_epoch
            at_epoch = epoch_after > epoch_before and epoch_after % args.validation_epochs == 0
            if args.validation_prompt and (at_epoch or global_step == max_steps):
                if main:
                    vae, text_encoder, imgs = _validate(args, recipe, accelerator, wrapped, vae, text_encoder, tokenizer,
                                                        noise_scheduler, weight_dtype, seed, released, epoch_after)
                    samples = [{"prompt": p, "path": str(path.relative_to(output_dir))} for p, path in imgs]
                accelerator.wait_for_everyone()

    accelerator.wait_for_everyone()
    out = None
    if main:
        out = _save_final(args, recipe, accelerator, wrapped, unet_cfg, te_cfg, global_step, num_epochs, seed, samples)
    accelerator.end_training()
    return out


def _release(module, device):
    """Free a frozen module's memory on the training device once its outputs are cached.

    On GPU it moves to CPU RAM (cheap to bring back for validation); on CPU the training
    device *is* RAM, so it is dropped and reloaded from disk if validation needs it.
    """
    if torch.device(device).type == "cpu":
        return None
    return module.to("cpu")


def _optimizer(args, groups):
    kw = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


def _validate(args, recipe, accelerator, wrapped, vae, text_encoder, tokenizer, noise_scheduler, weight_dtype,
              seed, released, epoch):
    """Sample with the current LoRA; returns (vae, text_encoder, [(prompt, saved path)])."""
    device = accelerator.device
    base = args.pretrained_model_name_or_path
    kw = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir, allow_pickle=args.allow_pickle)
    if vae is None:
        vae = models.load_vae(base, dtype=weight_dtype, **kw)
    if text_encoder is None:
        text_encoder = models.load_text_encoder(base, dtype=weight_dtype, **kw)
    vae = vae.to(device)
    te = accelerator.unwrap_model(wrapped["text_encoder"]) if "text_encoder" in wrapped else text_encoder.to(device)
    unet = accelerator.unwrap_model(wrapped["unet"])
    for m in wrapped.values():
        m.eval()  # no LoRA dropout while sampling
    log.info("validation at epoch %d: %d image(s) of %r", epoch, args.num_validation_images, args.validation_prompt)
    encode = None
    if recipe.max_length or recipe.use_attention_mask:  # condition exactly as in training
        def encode(texts):
            return models.encode_prompts(te, tokenizer, texts, recipe.max_length, recipe.use_attention_mask)
    with accelerator.autocast():
        imgs = validation.sample(unet, vae, te, tokenizer, noise_scheduler.config, [args.validation_prompt],
                                 args.num_validation_images, seed, args.resolution, encode=encode)
    for m in wrapped.values():
        m.train()
    out_dir = Path(args.output_dir) / "samples"
    validation.save(imgs, out_dir, f"epoch{epoch:04d}")
    latest = validation.save(imgs, out_dir, "latest")  # stable names the model card points at
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.log_images({"validation": np.stack([np.asarray(i) for _, i in imgs])}, step=epoch, dataformats="NHWC")
    # Send the helpers back where caching put them (off the training device, or dropped on CPU).
    if "vae" in released:
        vae = _release(vae, device)
    if "text_encoder" in released:
        text_encoder = _release(text_encoder, device)
    return vae, text_encoder, list(zip([p for p, _ in imgs], latest))


def _save_final(args, recipe, accelerator, wrapped, unet_cfg, te_cfg, steps, epochs, seed, samples) -> Path:
    output_dir = Path(args.output_dir)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.save_precision]
    sd = lora.lora_state_dict(accelerator.unwrap_model(wrapped["unet"]), "unet", dtype)
    configs = {"unet": unet_cfg}
    if "text_encoder" in wrapped:
        sd.update(lora.lora_state_dict(accelerator.unwrap_model(wrapped["text_encoder"]), "text_encoder", dtype))
        configs["text_encoder"] = te_cfg
    base = getattr(args, "base_model_name", args.pretrained_model_name_or_path)
    # The Hub validates base_model as a repo id: a pushed card must not carry a local path.
    local_base = Path(base).expanduser().exists() and base not in models.BUNDLED
    if args.push_to_hub and local_base:
        log.warning("model card: base_model left out of the front matter (%s is a local path, not a Hub id)", base)
    info = {
        "base_model": base, "base_model_in_front_matter": not (args.push_to_hub and local_base),
        "kind": recipe.kind, "rank": args.rank,
        "alpha": args.lora_alpha if args.lora_alpha is not None else args.rank, "target_modules": args.target_modules,
        "train_text_encoder": bool(args.train_text_encoder), "steps": steps, "epochs": epochs,
        "train_batch_size": args.train_batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate, "lr_scheduler": args.lr_scheduler, "resolution": args.resolution,
        "mixed_precision": accelerator.mixed_precision, "save_precision": args.save_precision, "seed": seed,
        "dataset": recipe.dataset_desc, "num_images": len(recipe.data.rows), "samples": samples,
        "repo_id": args.hub_model_id if args.push_to_hub else None, "extra_tags": recipe.extra_tags,
        "example_prompt": args.validation_prompt or getattr(args, "instance_prompt", None),
    }
    meta = {"format": "pt", "lora_adapter_metadata": lora.adapter_metadata(configs), **modelcard.safetensors_metadata(info)}
    path = output_dir / WEIGHTS_NAME
    save_safetensors(sd, path, meta)
    modelcard.write(output_dir, info, recipe.card_front, recipe.card_settings)
    log.info("saved %s (%d tensors, %d parameters, %.2f MB) and README.md", path, len(sd), lora.count_params(sd),
             path.stat().st_size / 1e6)
    return path


def run(args, make_recipe) -> int:
    """What both scripts do after parsing: check, resolve, read data, train, share.

    All user-fixable problems surface before any model is loaded, as one line on stderr.
    """
    import os
    import sys

    from . import hub, outdir
    from .args import check, setup_logging

    token = hub.resolve_token(args.hub_token)
    setup_logging(token)
    lock = None
    try:
        check(args)
        output_dir = Path(args.output_dir)
        if int(os.environ.get("RANK", "0")) == 0:  # one lock per run, held by the process that writes
            lock = outdir.OutputLock(output_dir)
            outdir.remove_leftovers(output_dir)
        earlier = checkpoint.list_checkpoints(output_dir)
        if earlier and not args.resume_from_checkpoint:
            raise UserError(f"--output_dir {output_dir} holds checkpoints of an earlier run ({earlier[-1].name}"
                            f"{f' and {len(earlier) - 1} more' if len(earlier) > 1 else ''}): continue it with "
                            "--resume_from_checkpoint latest, or choose another --output_dir")
        args.base_model_name = args.pretrained_model_name_or_path  # as given: a Hub id, a path or a short name
        args.pretrained_model_name_or_path = models.resolve_base(
            args.pretrained_model_name_or_path, args.revision, args.cache_dir, token)
        models.check_targets(args.pretrained_model_name_or_path, args.target_modules, args.revision, args.cache_dir)
        recipe = make_recipe(args)
        path = train(args, recipe)
        if path is not None and args.push_to_hub:
            hub.push(output_dir, args.hub_model_id, token)
    except UserError as e:
        print(f"error: {hub.redact(str(e), token)}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()
    return 0
