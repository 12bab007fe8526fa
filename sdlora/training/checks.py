"""Checking a run's settings: `check` validates a TrainConfig as a command line gave it and resolves it (the base
model's path, family and size, the buckets, the prompts file, …).

It runs before any model loads: each contradiction, missing package, unusable path, unknown base model or
unknown target layer is one line naming the flag.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Mapping

from .. import basecheck, io, models, quantize
from ..bases import load
from ..data.buckets import Bucketing
from ..errors import UserError
from . import diskcache, earlystop, noise, optimizers, prompts
from .config import TrainConfig, default_of
from .config.flow import SD3_ONLY

log = logging.getLogger("sdlora")


def _positive(name, value, minimum=1):
    if value is not None and value < minimum:
        raise UserError(f"--{name} must be >= {minimum} (got {value})")


def _check_adalora(c: TrainConfig):
    flags = {k: getattr(c, k) for k in ("adalora_init_r", "adalora_tinit", "adalora_tfinal")}
    if c.lora_type != "adalora":
        used = [f"--{k}" for k, v in flags.items() if v is not None] + ["--adalora_delta_t"] * (c.adalora_delta_t != 1)
        if used:
            raise UserError(f"{used[0]} applies to --lora_type adalora only; drop it or add --lora_type adalora")
        return
    if c.adalora_init_r is not None and c.adalora_init_r <= c.rank:
        raise UserError(f"--adalora_init_r {c.adalora_init_r} must be larger than --rank {c.rank} (AdaLoRA's "
                        "average final rank per layer): it prunes from the first down to the second")
    _positive("adalora_tinit", c.adalora_tinit, 0)
    _positive("adalora_tfinal", c.adalora_tfinal, 0)
    _positive("adalora_delta_t", c.adalora_delta_t)


def check(c: TrainConfig, token: str | None = None, *, data: Mapping[str, str | None] | None = None,
          hub_token: str | None = None, prior_preservation: bool = False) -> TrainConfig:
    """Validate the settings a command line gave (`config.from_flags`) and resolve them. `data`: the recipe's image
    folders by flag name (train_data_dir, instance_data_dir, class_data_dir); `hub_token`: --hub_token as given;
    `prior_preservation`: the run draws class images at --resolution. Loads no model; fetches at most the base
    model's model_index.json and UNet config when it is a Hub id."""
    data = {k: v for k, v in (data or {}).items() if v}
    targets = _check_flags(c)
    optim = optimizers.check(c)
    noise.check(c)
    earlystop.check(c)
    alpha = c.rank if c.lora_alpha is None else c.lora_alpha
    alpha = int(alpha) if float(alpha).is_integer() else alpha  # "8", not "8.0", in metadata viewers
    report_to = _check_report_to(c.report_to, hub_token)
    mixed_precision = c.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    _check_devices(c, mixed_precision)
    output_dir = Path(c.output_dir)
    check_writable(output_dir)
    _check_heldout(c, data)
    latents_cache_dir = _check_latents_cache(c, data)
    base, vae, configs = _resolve_bases(c, token)
    family, resolution, bucketing, unet_config, vae_config = _base_sizes(c, base, vae, prior_preservation, configs)
    sample_prompts = _check_sampling(c, resolution, models.sample_multiple(vae_config))
    models.check_targets(base, unet_config, list(targets),
                         None if c.init_lora_weights == "gaussian" else f"--init_lora_weights {c.init_lora_weights}")
    # What a run reads (or caches into): inside --output_dir these are the user's, not files in the way.
    inputs = [*data.values(), c.validation_data_dir, c.mask_dir, c.sample_prompts_file, c.latents_cache_dir]
    return replace(c, **load.file_settings(c, token), base=base, base_config=None if configs == base else configs,
                   family=family, output_dir=output_dir, pretrained_vae_model_name_or_path=vae or None,
                   resolution=resolution, lora_alpha=alpha, target_modules=targets, report_to=report_to,
                   mixed_precision=mixed_precision, precision_chosen=c.mixed_precision is not None,
                   bucketing=bucketing, mask_dir=Path(c.mask_dir) if c.mask_dir else None,
                   validation_data_dir=Path(c.validation_data_dir) if c.validation_data_dir else None,
                   latents_cache_dir=latents_cache_dir, sample_prompts=sample_prompts,
                   inputs=tuple(Path(v) for v in inputs if v),
                   hub_model_id=c.hub_model_id or (output_dir.resolve().name if c.push_to_hub else None), **optim)


def _check_flags(c: TrainConfig) -> tuple[str, ...]:
    """The checks of the settings alone (no file, package or model looked at); the --target_modules names."""
    targets = tuple(m.strip() for m in str(c.target_modules).split(",") if m.strip()) \
        if isinstance(c.target_modules, str) else tuple(c.target_modules)
    if not targets:
        raise UserError("--target_modules is empty; e.g. --target_modules to_q,to_k,to_v,to_out.0")
    for name in ("resolution", "train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "rank",
                 "num_validation_images", "validation_epochs", "clip_skip"):  # (None: the default)
        _positive(name, getattr(c, name))
    _positive("max_train_steps", c.max_train_steps)
    _positive("checkpointing_steps", c.checkpointing_steps)
    _positive("checkpoints_total_limit", c.checkpoints_total_limit)
    if c.random_crop and c.center_crop:
        raise UserError("--random_crop and --center_crop contradict each other; keep one (random is the default)")
    if c.learning_rate <= 0:
        raise UserError(f"--learning_rate must be > 0 (got {c.learning_rate})")
    if not 0 <= c.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be in [0, 1) (got {c.lora_dropout})")
    _check_lora_type(c)
    if c.lora_alpha is not None and c.lora_alpha <= 0:
        raise UserError(f"--lora_alpha must be > 0 (got {c.lora_alpha})")
    return targets


def _check_lora_type(c: TrainConfig):
    """The --lora_type against the other LoRA settings and --quantize_base."""
    if c.lora_type == "dora" and c.init_lora_weights != "gaussian":
        raise UserError(f"--init_lora_weights {c.init_lora_weights} can't be used with --lora_type dora: a DoRA "
                        "file can't be written as a change from the unmodified base; use one of the two")
    if c.lora_type in ("loha", "lokr", "adalora"):
        name = {"loha": "LoHa", "lokr": "LoKr", "adalora": "AdaLoRA"}[c.lora_type]
        for flag, bad in (("--use_rslora", c.use_rslora),
                          ("--lora_dropout", c.lora_dropout > 0 and c.lora_type != "adalora"),
                          (f"--init_lora_weights {c.init_lora_weights}", c.init_lora_weights != "gaussian")):
            if bad:  # peft's LoHa/LoKr have none of these (and no file format records them)
                raise UserError(f"{flag} can't be used with --lora_type {c.lora_type}: it applies to LoRA and DoRA "
                                f"only; drop it to train {name}")
    _check_adalora(c)
    if c.quantize_base != "none" and c.lora_type in ("loha", "lokr"):  # peft builds them from the packed weights
        raise UserError(f"--lora_type {c.lora_type} can't be used with --quantize_base {c.quantize_base}: peft's "
                        "LoHa/LoKr layers do not support bitsandbytes' quantized layers; use lora, dora or adalora, or "
                        "--quantize_base none")
    if c.quantize_base != "none" and c.init_lora_weights != "gaussian":
        raise UserError(f"--init_lora_weights {c.init_lora_weights} can't be used with --quantize_base "
                        f"{c.quantize_base}: it rewrites the frozen weights, which are quantized; use one of the two")


def sizing(c: TrainConfig, token: str | None = None, prior_preservation: bool = False) -> tuple[str, int, Bucketing]:
    """(family, resolution, bucketing) for these settings, from the base's config files only (the UI's data
    preview shows the bucket table a run would use)."""
    base, vae, configs = _resolve_bases(c, token)
    return _base_sizes(c, base, vae, prior_preservation, configs)[:3]


def _resolve_bases(c: TrainConfig, token: str | None) -> tuple[str, str | None, str]:
    """The base model's and the --pretrained_vae_model_name_or_path's loadable folder or Hub id, and where the
    base's configs are: the folder itself, or for a single-file checkpoint its --base_config (bases.load)."""
    base, configs = load.resolve(c, token) or (models.resolve_base(c.base_name, c.revision, c.cache_dir, token),) * 2
    vae = c.pretrained_vae_model_name_or_path and models.resolve_base(
        c.pretrained_vae_model_name_or_path, None, c.cache_dir, token, "--pretrained_vae_model_name_or_path",
        vae=True)
    if vae:
        _check_vae(c.pretrained_vae_model_name_or_path, vae, c.cache_dir)
    return base, vae, configs


def _base_sizes(c: TrainConfig, base: str, vae: str | None, prior_preservation: bool,
                configs: str | None = None) -> tuple[str, int, Bucketing, dict, dict]:
    """(family, resolution, bucketing, UNet config, VAE config): the base's files checked (basecheck), then the
    sizes the flags ask for checked against the ones the base's configs give (`configs`: where they are, if not in
    `base`), not SD's."""
    base = configs or base
    basecheck.check(base, vae or None, c.variant, t5=not c.drop_t5)
    pipeline_class, unet_config, vae_config = models.base_configs(base, c.revision, c.cache_dir, vae or None)
    if not unet_config or not vae_config:  # a Hub base whose configs did not download: its sizes are unknown
        raise UserError(f"--pretrained_model_name_or_path {c.base_name}: its "
                        f"{'unet' if not unet_config else 'vae'}/config.json could not be read; check the model id "
                        f"and your connection, or download it and give its folder")
    family = _check_family(c, pipeline_class, unet_config)
    _check_token_length(c, base)
    resolution = _resolution(c, unet_config, vae_config, prior_preservation)
    bucketing = _bucketing(c, resolution, models.vae_factor(vae_config),
                           models.size_multiple(unet_config, vae_config))
    return family, resolution, bucketing, unet_config, vae_config


def _check_family(c: TrainConfig, pipeline_class: str | None, unet_config: dict) -> str:
    """The base's family from its config files, and the flags that family cannot use."""
    family = models.family_of(unet_config, pipeline_class)
    xl_unused = ("tokenizer_max_length", "text_encoder_use_attention_mask", "clip_skip") if family == "sdxl" else ()
    if given := [f for f in xl_unused if getattr(c, f)]:  # SDXL conditions on both encoders' full 77 tokens
        raise UserError(f"--{given[0]} is not used with an SDXL base ({c.base_name}); drop it")
    if given := [f for f in SD3_ONLY if family != "sd3" and getattr(c, f) != default_of(f)]:  # else ignored
        raise UserError(f"--{given[0]} is an SD3 / 3.5 setting, not used with an {models.FAMILIES[family]} base "
                        f"({c.base_name}); drop it")
    return family


def _check_vae(name: str, path: str, cache_dir) -> None:
    """A --pretrained_vae_model_name_or_path whose config.json describes another model (a UNet folder given by
    mistake) is one line now, not a load error after the text encoders have loaded."""
    from diffusers import AutoencoderKL

    try:
        kind = AutoencoderKL.load_config(path, cache_dir=cache_dir).get("_class_name")
    except Exception:  # unreadable: loading it reports the real problem
        return
    if kind not in (None, "AutoencoderKL"):
        raise UserError(f"--pretrained_vae_model_name_or_path {name}: its config.json describes a {kind}, not a VAE "
                        f"(AutoencoderKL); give the VAE's folder")


def default_resolution(unet_config: dict, vae_config: dict) -> int | None:
    """The base's own image size: its UNet's sample size times the VAE's downsampling (512 for SD 1.5, 768 for
    SD 2.x 768-v, 1024 for SDXL 1.0, 32 for sdlora-tiny), as diffusers' pipelines draw by default. None when the
    UNet config has no sample size."""
    size = unet_config.get("sample_size")
    if isinstance(size, (list, tuple)):  # [height, width]: the longer side
        size = max(size)
    return size * models.vae_factor(vae_config) if isinstance(size, int) and size > 0 else None


def _resolution(c: TrainConfig, unet_config: dict, vae_config: dict, prior_preservation: bool) -> int:
    """--resolution, a multiple of the base's VAE factor (latents have whole sides), or the base's own size."""
    own, factor = default_resolution(unet_config, vae_config), models.vae_factor(vae_config)
    resolution = c.resolution or own
    if resolution is None:
        raise UserError(f"--resolution: the base {c.base_name} has no sample_size in its "
                        f"unet/config.json to take its own size from; give --resolution")
    if resolution % factor:
        raise UserError(f"--resolution must be a multiple of {factor}, the VAE's downsampling (got {resolution}); "
                        f"use {models.multiples_near(resolution, factor)}")
    multiple = models.sample_multiple(vae_config)
    drawn = [f for f, on in (("validation_prompt", c.validation_prompt),
                             ("with_prior_preservation", prior_preservation)) if on]  # class images
    if drawn and resolution % multiple:
        raise UserError(f"--resolution {resolution}: --{drawn[0]} draws images at it, and diffusers' pipelines "
                        f"draw sides in multiples of {multiple}; give --resolution "
                        f"{models.multiples_near(resolution, multiple)}")
    if c.resolution and own and c.resolution > 2 * own:  # a step costs the square of the ratio
        log.warning("--resolution %d is %.0fx this base's own size (%d px, its UNet's sample_size x the VAE's %d): "
                    "each step costs about %.0fx as much; the base was trained at %d px", c.resolution,
                    c.resolution / own, own, factor, (c.resolution / own) ** 2, own)
    return resolution


def _check_token_length(c: TrainConfig, base: str):
    """DreamBooth's --tokenizer_max_length against the tokens the base's text encoder takes (its position
    embeddings): more would index past them at the first step."""
    length = c.tokenizer_max_length
    if not length:
        return
    _positive("tokenizer_max_length", length)
    from transformers import CLIPTextConfig

    try:
        limit = CLIPTextConfig.from_pretrained(base, subfolder="text_encoder", revision=c.revision,
                                               cache_dir=c.cache_dir).max_position_embeddings
    except Exception:  # unreadable: loading reports it
        return
    if length > limit:
        raise UserError(f"--tokenizer_max_length {length}: the base's text encoder takes at most {limit} tokens "
                        f"(max_position_embeddings); use {limit} or less")


def _bucketing(c: TrainConfig, resolution: int, factor: int, multiple: int) -> Bucketing:
    """The bucket settings, checked: a setting that leaves no bucket is an error here, before any model loads.
    `factor`: the base's VAE downsampling, which a side must be a multiple of; `multiple`: the base's pixel multiple
    (VAE x UNet downsampling), the default step."""
    if c.no_bucket and c.enable_bucket:
        raise UserError("--no_bucket and --enable_bucket contradict each other; keep one (buckets are the default)")
    step = c.bucket_reso_steps or multiple
    for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        _positive(name, getattr(c, name))
    if step % factor:
        raise UserError(f"--bucket_reso_steps must be a multiple of {factor}, the VAE's downsampling (got {step}); "
                        f"use {multiple}")
    if step % multiple:
        log.warning("--bucket_reso_steps %d is not a multiple of %d (this model's VAE x UNet downsampling); "
                    "the UNet pads odd latent sizes, which trains slightly worse", step, multiple)
    if c.min_bucket_reso and c.max_bucket_reso and c.min_bucket_reso > c.max_bucket_reso:
        raise UserError(f"--min_bucket_reso {c.min_bucket_reso} is larger than --max_bucket_reso "
                        f"{c.max_bucket_reso}; swap them")
    b = Bucketing(resolution, enabled=not c.no_bucket, min_reso=c.min_bucket_reso,
                  max_reso=c.max_bucket_reso, step=step, no_upscale=c.bucket_no_upscale)
    b.table()  # raises when the flags leave no bucket
    return b


def _check_heldout(c: TrainConfig, data: Mapping[str, str]):
    """--masked_loss and the held-out loss flags, and their files, before anything loads."""
    if c.mask_dir and not c.masked_loss:
        raise UserError("--mask_dir is only read with --masked_loss; add --masked_loss")
    if c.mask_dir and not Path(c.mask_dir).is_dir():
        raise UserError(f"--mask_dir {c.mask_dir}: not a folder; give the folder of masks")
    if c.validation_split is not None and not 0 < c.validation_split < 1:
        raise UserError(f"--validation_split must be between 0 and 1, e.g. 0.1 (got {c.validation_split})")
    if c.validation_split and c.validation_data_dir:
        raise UserError("give --validation_split or --validation_data_dir, not both")
    if c.validation_data_dir and not Path(c.validation_data_dir).is_dir():
        raise UserError(f"--validation_data_dir {c.validation_data_dir}: not a folder; give a folder of images")
    for flag in ("train_data_dir", "instance_data_dir"):
        train = data.get(flag)
        if c.validation_data_dir and train and Path(train).is_dir():
            a, b = Path(c.validation_data_dir).resolve(), Path(train).resolve()
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                raise UserError(f"--validation_data_dir {c.validation_data_dir} overlaps --{flag} {train}: a loss on "
                                f"trained images measures nothing; give a folder of other images, or --validation_split")
    _positive("validation_loss_steps", c.validation_loss_steps)
    if c.validation_loss_steps and not (c.validation_split or c.validation_data_dir):
        raise UserError("--validation_loss_steps needs held-out images: add --validation_split 0.1 or "
                        "--validation_data_dir DIR")


def _check_latents_cache(c: TrainConfig, data: Mapping[str, str]) -> Path | None:
    """--cache_latents_to_disk's folder, writable and outside every data folder (those are never written to)."""
    if c.latents_cache_dir and not c.cache_latents_to_disk:
        raise UserError("--latents_cache_dir is only used with --cache_latents_to_disk; add --cache_latents_to_disk")
    if not c.cache_latents_to_disk:
        return None
    if c.no_cache:
        raise UserError("--no_cache and --cache_latents_to_disk contradict each other; keep one")
    folder = Path(c.latents_cache_dir).expanduser() if c.latents_cache_dir else diskcache.default_dir()
    for flag, used in [*data.items(), ("validation_data_dir", c.validation_data_dir)]:
        if used and folder.resolve().is_relative_to(Path(used).expanduser().resolve()):
            raise UserError(f"--latents_cache_dir {folder} is inside --{flag} {used}, and sdlora never writes into "
                            f"a data folder; choose a folder outside it")
    check_writable(folder, "--latents_cache_dir")
    return folder


def _check_sampling(c: TrainConfig, resolution: int, multiple: int) -> tuple[prompts.SamplePrompt, ...]:
    """The --sample_prompts file, read and checked now, so a bad line never stops a run half-way; `multiple`: what
    a sampled side must be a multiple of (models.sample_multiple)."""
    _positive("sample_every_n_steps", c.sample_every_n_steps)
    _positive("sample_every_n_epochs", c.sample_every_n_epochs)
    if not c.sample_prompts_file:
        for flag in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first"):
            if getattr(c, flag):
                raise UserError(f"--{flag} needs --sample_prompts FILE, the prompts to sample (one per line)")
        return ()
    return prompts.read(c.sample_prompts_file, resolution, multiple)


def _check_report_to(report_to: str, hub_token: str | None) -> str:
    from accelerate.utils import is_tensorboard_available, is_wandb_available  # metadata lookups, no imports

    if report_to == "all":
        report_to = "tensorboard" if not is_wandb_available() else "all"
    if report_to == "wandb" and not is_wandb_available():
        raise UserError("--report_to wandb needs the wandb package: pip install wandb (or use --report_to tensorboard)")
    if report_to == "tensorboard" and not is_tensorboard_available():
        raise UserError("--report_to tensorboard needs tensorboard: pip install tensorboard (or --report_to none)")
    if hub_token and report_to in ("wandb", "all"):
        raise UserError("--hub_token together with --report_to wandb would expose the token in wandb's logged "
                        "config; use `hf auth login` or HF_TOKEN instead")
    return report_to


def _check_devices(c: TrainConfig, mixed_precision: str | None):
    import torch

    cuda = torch.cuda.is_available()
    if mixed_precision == "fp16" and not cuda:
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")
    if c.enable_xformers_memory_efficient_attention:
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            raise UserError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                            "(pip install xformers, CUDA only); PyTorch's SDPA attention is used by default")
        if not cuda:
            raise UserError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; drop the flag on CPU")
    if c.compile:
        _check_compiler(cuda)
    quantize.check(c.quantize_base, cuda)
    if c.quantize_base == "int8" and c.lora_type == "dora" and not cuda:
        # On CPU bitsandbytes trains 8-bit layers through MatMul8bitFp; after peft's DoRA has dequantized the weight
        # for its norm, the layer's 8-bit state has no scales and the second step fails with an AttributeError
        # (bitsandbytes 0.50.2, peft 0.21.2; not tried on a GPU, which runs MatMul8bitLt instead)
        raise UserError("--lora_type dora can't be used with --quantize_base int8 on CPU (peft's DoRA breaks "
                        "bitsandbytes' 8-bit layers there); use --quantize_base nf4")
    if c.use_8bit_adam:
        from accelerate.utils import is_bnb_available

        if not is_bnb_available():
            raise UserError("--use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes; needs a CUDA GPU)")
        if not cuda:
            raise UserError("--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit optimizers); drop the flag on CPU")


def _check_compiler(cuda: bool):
    """--compile's inductor backend builds C++ kernels on CPU (Triton ones on GPU): without a compiler it would
    fail at the first step, after the models load."""
    import shutil

    if cuda:
        from accelerate.utils import is_triton_available

        if not is_triton_available():
            raise UserError("--compile: torch.compile needs Triton on a GPU (pip install triton); drop the flag")
    elif not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise UserError("--compile: torch.compile needs a C++ compiler on CPU (e.g. apt-get install g++); drop the flag")


def check_writable(folder: Path, flag: str = "--output_dir"):
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise UserError(f"{flag} {folder} is a file; give a folder (a new one, or an empty one of yours)" if p == folder
                            else f"{flag} {folder}: {p} is a file, not a folder; choose another {flag}")
        if p.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        io.new_tmp(folder / "write-test").unlink()  # sdlora's temp name: never taken for a file of the user's
    except OSError as e:
        raise UserError(f"{flag} {folder}: not writable ({e.strerror}); choose another folder") from None
