"""The training configuration: every setting the loop reads, checked once and frozen.

`check(args)` is the one place a training flag is read from the parsed command line and the one
place it is validated. It runs before any model loads: each contradiction, missing package,
unusable path, unknown base model or unknown target layer is one line naming the flag.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .. import basecheck, io, models, quantize
from ..data.buckets import Bucketing
from ..errors import UserError
from . import diskcache, prompts

log = logging.getLogger("sdlora")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # the base model
    base: str  # a loadable folder or Hub id (resolved from base_name)
    base_name: str  # as the user gave it: a Hub id, a path or a short name such as sdlora-tiny
    family: str = "sd1"  # resolved from the base's config files: "sd1", "sd2" or "sdxl" (models.family_of)
    pretrained_vae_model_name_or_path: str | None = None  # a VAE to use instead of the base's (resolved)
    revision: str | None = None
    variant: str | None = None
    cache_dir: str | None = None
    allow_pickle: bool = False
    prediction_type: str | None = None
    zero_terminal_snr: bool = False
    # the run
    output_dir: Path
    overwrite_output_dir: bool = False  # write beside files sdlora did not write, and over its own earlier output
    inputs: tuple[Path, ...] = ()  # folders and files the flags name to read (or cache into): not the output's
    logging_dir: str = "logs"
    seed: int | None = None  # None: a random seed, drawn and recorded by the loop
    resume_from_checkpoint: str | None = None
    # data and batches
    resolution: int = 512  # resolved: the flag, else the base's own size (UNet sample_size x VAE factor)
    center_crop: bool = False
    random_flip: bool = False
    train_batch_size: int = 1
    num_train_epochs: int = 1
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    dataloader_num_workers: int = 0
    no_cache: bool = False
    cache_latents_to_disk: bool = False
    latents_cache_dir: Path | None = None  # resolved: the flag, else diskcache.default_dir(); None without the cache
    pre_compute_text_embeddings: bool = False
    bucketing: Bucketing  # resolved from --resolution, --no_bucket and the --*bucket* flags
    masked_loss: bool = False
    mask_dir: Path | None = None
    validation_split: float | None = None
    validation_data_dir: Path | None = None
    validation_loss_steps: int | None = None
    # optimisation
    learning_rate: float = 1e-4
    scale_lr: bool = False
    text_encoder_lr: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    use_8bit_adam: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_weight_decay_text_encoder: float | None = None  # None: --adam_weight_decay
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # speed and memory
    mixed_precision: str | None = None
    precision_chosen: bool = False  # --mixed_precision given: the log states it, without advice against it
    gradient_checkpointing: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    compile: bool = False
    allow_tf32: bool = False
    quantize_base: str = "none"  # "int8" / "nf4": the UNet's frozen Linear weights in bitsandbytes' 8 / 4 bits
    # LoRA
    rank: int = 4
    lora_alpha: float = 4  # resolved: --rank when not given
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: str = "gaussian"
    lora_type: str = "lora"
    adalora_init_r: int | None = None  # AdaLoRA's starting rank per layer (None: 1.5 x --rank)
    adalora_tinit: int | None = None  # steps before pruning starts (None: 10% of the steps)
    adalora_tfinal: int | None = None  # steps at the final ranks (None: 20% of the steps)
    adalora_delta_t: int = 1  # prune every N steps
    target_modules: tuple[str, ...] = ()
    train_text_encoder: bool = False
    save_precision: str = "fp32"
    # checkpoints, logs, validation, sharing
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    report_to: str = "tensorboard"
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_epochs: int = 1
    sample_prompts: tuple[prompts.SamplePrompt, ...] = ()  # parsed from sample_prompts_file
    sample_prompts_file: str | None = None
    sample_every_n_steps: int | None = None  # with neither cadence, one round at the end
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None

    def tracker_config(self) -> dict:
        """What the experiment trackers record (plain values only; the token is never part of a config)."""
        return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in asdict(self).items() if v is not None and k != "sample_prompts"}  # the file is there


def _positive(name, value, minimum=1):
    if value is not None and value < minimum:
        raise UserError(f"--{name} must be >= {minimum} (got {value})")


def _check_adalora(args):
    flags = {k: getattr(args, k) for k in ("adalora_init_r", "adalora_tinit", "adalora_tfinal")}
    if args.lora_type != "adalora":
        used = [f"--{k}" for k, v in flags.items() if v is not None] + ["--adalora_delta_t"] * (args.adalora_delta_t != 1)
        if used:
            raise UserError(f"{used[0]} applies to --lora_type adalora only; drop it or add --lora_type adalora")
        return
    if args.adalora_init_r is not None and args.adalora_init_r <= args.rank:
        raise UserError(f"--adalora_init_r {args.adalora_init_r} must be larger than --rank {args.rank} (AdaLoRA's "
                        "average final rank per layer): it prunes from the first down to the second")
    _positive("adalora_tinit", args.adalora_tinit, 0)
    _positive("adalora_tfinal", args.adalora_tfinal, 0)
    _positive("adalora_delta_t", args.adalora_delta_t)


def adalora_schedule(config, max_steps: int) -> tuple[int, int, int]:
    """(init_r, tinit, tfinal) for a run of `max_steps`; a schedule that leaves no step to prune in is one line."""
    init_r = config.adalora_init_r or config.rank + max(1, config.rank // 2)
    tinit = max_steps // 10 if config.adalora_tinit is None else config.adalora_tinit
    tfinal = max_steps // 5 if config.adalora_tfinal is None else config.adalora_tfinal
    if tinit >= max_steps - tfinal:
        raise UserError(f"--adalora_tinit {tinit} and --adalora_tfinal {tfinal} leave no step of the {max_steps} to "
                        "prune ranks in; lower them or train longer")
    return init_r, tinit, tfinal


def check(args, token: str | None = None) -> TrainConfig:
    """Validate the parsed flags and resolve them into a TrainConfig. Loads no model; fetches at most the
    base model's model_index.json and UNet config when it is a Hub id."""
    targets = tuple(m.strip() for m in str(args.target_modules).split(",") if m.strip()) \
        if isinstance(args.target_modules, str) else tuple(args.target_modules)
    if not targets:
        raise UserError("--target_modules is empty; e.g. --target_modules to_q,to_k,to_v,to_out.0")
    for name in ("resolution", "train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "rank",
                 "num_validation_images", "validation_epochs"):  # (resolution None: the base's default)
        _positive(name, getattr(args, name))
    _positive("max_train_steps", args.max_train_steps)
    _positive("checkpointing_steps", args.checkpointing_steps)
    _positive("checkpoints_total_limit", args.checkpoints_total_limit)
    if args.random_crop and args.center_crop:
        raise UserError("--random_crop and --center_crop contradict each other; keep one (random is the default)")
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be > 0 (got {args.learning_rate})")
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be in [0, 1) (got {args.lora_dropout})")
    if args.lora_type == "dora" and args.init_lora_weights != "gaussian":
        raise UserError(f"--init_lora_weights {args.init_lora_weights} can't be used with --lora_type dora: a DoRA "
                        "file can't be written as a change from the unmodified base; use one of the two")
    if args.lora_type in ("loha", "lokr", "adalora"):
        name = {"loha": "LoHa", "lokr": "LoKr", "adalora": "AdaLoRA"}[args.lora_type]
        for flag, bad in (("--use_rslora", args.use_rslora),
                          ("--lora_dropout", args.lora_dropout > 0 and args.lora_type != "adalora"),
                          (f"--init_lora_weights {args.init_lora_weights}", args.init_lora_weights != "gaussian")):
            if bad:  # peft's LoHa/LoKr have none of these (and no file format records them)
                raise UserError(f"{flag} can't be used with --lora_type {args.lora_type}: it applies to LoRA and DoRA "
                                f"only; drop it to train {name}")
    _check_adalora(args)
    if args.quantize_base != "none" and args.lora_type in ("loha", "lokr"):  # peft builds them from the packed weights
        raise UserError(f"--lora_type {args.lora_type} can't be used with --quantize_base {args.quantize_base}: peft's "
                        "LoHa/LoKr layers do not support bitsandbytes' quantized layers; use lora, dora or adalora, or "
                        "--quantize_base none")
    if args.quantize_base != "none" and args.init_lora_weights != "gaussian":
        raise UserError(f"--init_lora_weights {args.init_lora_weights} can't be used with --quantize_base "
                        f"{args.quantize_base}: it rewrites the frozen weights, which are quantized; use one of the two")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        raise UserError(f"--lora_alpha must be > 0 (got {args.lora_alpha})")
    alpha = args.rank if args.lora_alpha is None else args.lora_alpha
    alpha = int(alpha) if float(alpha).is_integer() else alpha  # "8", not "8.0", in metadata viewers
    report_to = _check_report_to(args.report_to, args.hub_token)
    mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    _check_devices(args, mixed_precision)
    output_dir = Path(args.output_dir)
    check_writable(output_dir)
    _check_heldout(args)
    latents_cache_dir = _check_latents_cache(args)
    base = models.resolve_base(args.pretrained_model_name_or_path, args.revision, args.cache_dir, token)
    vae = args.pretrained_vae_model_name_or_path and models.resolve_base(
        args.pretrained_vae_model_name_or_path, None, args.cache_dir, token, "--pretrained_vae_model_name_or_path",
        vae=True)
    if vae:
        _check_vae(args.pretrained_vae_model_name_or_path, vae, args.cache_dir)
    family, resolution, bucketing, unet_config, vae_config = _base_sizes(args, base, vae)
    sample_prompts = _check_sampling(args, resolution, models.sample_multiple(vae_config))
    models.check_targets(base, unet_config, list(targets),
                         None if args.init_lora_weights == "gaussian" else f"--init_lora_weights {args.init_lora_weights}")

    resolved = dict(base=base, base_name=args.pretrained_model_name_or_path, family=family, output_dir=output_dir,
                    pretrained_vae_model_name_or_path=vae or None, resolution=resolution,
                    lora_alpha=alpha, target_modules=targets, report_to=report_to,
                    mixed_precision=mixed_precision, precision_chosen=args.mixed_precision is not None,
                    bucketing=bucketing,
                    mask_dir=Path(args.mask_dir) if args.mask_dir else None,
                    validation_data_dir=Path(args.validation_data_dir) if args.validation_data_dir else None,
                    latents_cache_dir=latents_cache_dir,
                    sample_prompts=sample_prompts, sample_prompts_file=args.sample_prompts,
                    inputs=tuple(Path(v) for k in _INPUTS if (v := getattr(args, k, None))),
                    hub_model_id=args.hub_model_id or (output_dir.resolve().name if args.push_to_hub else None))
    # Every other field is the flag of the same name; knobs only one script has keep their defaults.
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name not in resolved and hasattr(args, f.name)}
    return TrainConfig(**given, **resolved)


# Flags naming what a run reads (or caches into): inside --output_dir they are the user's, not files in the way.
_INPUTS = ("train_data_dir", "instance_data_dir", "class_data_dir", "validation_data_dir", "mask_dir", "sample_prompts",
           "latents_cache_dir")


def sizing(args, token: str | None = None) -> tuple[str, int, Bucketing]:
    """(family, resolution, bucketing) for the parsed flags, from the base's config files only (the UI's data
    preview shows the bucket table a run would use)."""
    base = models.resolve_base(args.pretrained_model_name_or_path, args.revision, args.cache_dir, token)
    vae = args.pretrained_vae_model_name_or_path and models.resolve_base(
        args.pretrained_vae_model_name_or_path, None, args.cache_dir, token, "--pretrained_vae_model_name_or_path",
        vae=True)
    return _base_sizes(args, base, vae)[:3]


def _base_sizes(args, base: str, vae: str | None) -> tuple[str, int, Bucketing, dict, dict]:
    """(family, resolution, bucketing, UNet config, VAE config): the base's files checked (basecheck), then the
    sizes the flags ask for checked against the ones the base's configs give, not SD's."""
    basecheck.check(base, vae or None, args.variant)
    pipeline_class, unet_config, vae_config = models.base_configs(base, args.revision, args.cache_dir, vae or None)
    if not unet_config or not vae_config:  # a Hub base whose configs did not download: its sizes are unknown
        raise UserError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: its "
                        f"{'unet' if not unet_config else 'vae'}/config.json could not be read; check the model id "
                        f"and your connection, or download it and give its folder")
    family = _check_family(args, pipeline_class, unet_config)
    _check_token_length(args, base)
    resolution = _resolution(args, unet_config, vae_config)
    bucketing = _bucketing(args, resolution, models.vae_factor(vae_config),
                           models.size_multiple(unet_config, vae_config))
    return family, resolution, bucketing, unet_config, vae_config


def _check_family(args, pipeline_class: str | None, unet_config: dict) -> str:
    """The base's family from its config files, and the flags that family cannot use."""
    family = models.family_of(unet_config, pipeline_class)
    if family == "sdxl":
        # SDXL conditions on two encoders' full 77-token sequences (diffusers' SDXL scripts have neither flag)
        for flag in ("tokenizer_max_length", "text_encoder_use_attention_mask"):
            if getattr(args, flag, None):
                raise UserError(f"--{flag} is not used with an SDXL base ({args.pretrained_model_name_or_path}); "
                                f"drop it")
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


def _resolution(args, unet_config: dict, vae_config: dict) -> int:
    """--resolution, a multiple of the base's VAE factor (latents have whole sides), or the base's own size."""
    own, factor = default_resolution(unet_config, vae_config), models.vae_factor(vae_config)
    resolution = args.resolution or own
    if resolution is None:
        raise UserError(f"--resolution: the base {args.pretrained_model_name_or_path} has no sample_size in its "
                        f"unet/config.json to take its own size from; give --resolution")
    if resolution % factor:
        raise UserError(f"--resolution must be a multiple of {factor}, the VAE's downsampling (got {resolution}); "
                        f"use {models.multiples_near(resolution, factor)}")
    multiple = models.sample_multiple(vae_config)
    drawn = [f for f in ("validation_prompt", "with_prior_preservation") if getattr(args, f, None)]  # class images
    if drawn and resolution % multiple:
        raise UserError(f"--resolution {resolution}: --{drawn[0]} draws images at it, and diffusers' pipelines "
                        f"draw sides in multiples of {multiple}; give --resolution "
                        f"{models.multiples_near(resolution, multiple)}")
    if args.resolution and own and args.resolution > 2 * own:  # a step costs the square of the ratio
        log.warning("--resolution %d is %.0fx this base's own size (%d px, its UNet's sample_size x the VAE's %d): "
                    "each step costs about %.0fx as much; the base was trained at %d px", args.resolution,
                    args.resolution / own, own, factor, (args.resolution / own) ** 2, own)
    return resolution


def _check_token_length(args, base: str):
    """DreamBooth's --tokenizer_max_length against the tokens the base's text encoder takes (its position
    embeddings): more would index past them at the first step."""
    length = getattr(args, "tokenizer_max_length", None)
    if not length:
        return
    _positive("tokenizer_max_length", length)
    from transformers import CLIPTextConfig

    try:
        limit = CLIPTextConfig.from_pretrained(base, subfolder="text_encoder", revision=args.revision,
                                               cache_dir=args.cache_dir).max_position_embeddings
    except Exception:  # unreadable: loading reports it
        return
    if length > limit:
        raise UserError(f"--tokenizer_max_length {length}: the base's text encoder takes at most {limit} tokens "
                        f"(max_position_embeddings); use {limit} or less")


def _bucketing(args, resolution: int, factor: int, multiple: int) -> Bucketing:
    """The bucket settings, checked: a setting that leaves no bucket is an error here, before any model loads.
    `factor`: the base's VAE downsampling, which a side must be a multiple of; `multiple`: the base's pixel multiple
    (VAE x UNet downsampling), the default step."""
    if args.no_bucket and args.enable_bucket:
        raise UserError("--no_bucket and --enable_bucket contradict each other; keep one (buckets are the default)")
    step = args.bucket_reso_steps or multiple
    for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        _positive(name, getattr(args, name))
    if step % factor:
        raise UserError(f"--bucket_reso_steps must be a multiple of {factor}, the VAE's downsampling (got {step}); "
                        f"use {multiple}")
    if step % multiple:
        log.warning("--bucket_reso_steps %d is not a multiple of %d (this model's VAE x UNet downsampling); "
                    "the UNet pads odd latent sizes, which trains slightly worse", step, multiple)
    if args.min_bucket_reso and args.max_bucket_reso and args.min_bucket_reso > args.max_bucket_reso:
        raise UserError(f"--min_bucket_reso {args.min_bucket_reso} is larger than --max_bucket_reso "
                        f"{args.max_bucket_reso}; swap them")
    b = Bucketing(resolution, enabled=not args.no_bucket, min_reso=args.min_bucket_reso,
                  max_reso=args.max_bucket_reso, step=step, no_upscale=args.bucket_no_upscale)
    b.table()  # raises when the flags leave no bucket
    return b


def _check_heldout(args):
    """--masked_loss and the held-out loss flags, and their files, before anything loads."""
    if args.mask_dir and not args.masked_loss:
        raise UserError("--mask_dir is only read with --masked_loss; add --masked_loss")
    if args.mask_dir and not Path(args.mask_dir).is_dir():
        raise UserError(f"--mask_dir {args.mask_dir}: not a folder; give the folder of masks")
    if args.validation_split is not None and not 0 < args.validation_split < 1:
        raise UserError(f"--validation_split must be between 0 and 1, e.g. 0.1 (got {args.validation_split})")
    if args.validation_split and args.validation_data_dir:
        raise UserError("give --validation_split or --validation_data_dir, not both")
    if args.validation_data_dir and not Path(args.validation_data_dir).is_dir():
        raise UserError(f"--validation_data_dir {args.validation_data_dir}: not a folder; give a folder of images")
    for flag in ("train_data_dir", "instance_data_dir"):
        train = getattr(args, flag, None)
        if args.validation_data_dir and train and Path(train).is_dir():
            a, b = Path(args.validation_data_dir).resolve(), Path(train).resolve()
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                raise UserError(f"--validation_data_dir {args.validation_data_dir} overlaps --{flag} {train}: a loss on "
                                f"trained images measures nothing; give a folder of other images, or --validation_split")
    _positive("validation_loss_steps", args.validation_loss_steps)
    if args.validation_loss_steps and not (args.validation_split or args.validation_data_dir):
        raise UserError("--validation_loss_steps needs held-out images: add --validation_split 0.1 or "
                        "--validation_data_dir DIR")


def _check_latents_cache(args) -> Path | None:
    """--cache_latents_to_disk's folder, writable and outside every data folder (those are never written to)."""
    if args.latents_cache_dir and not args.cache_latents_to_disk:
        raise UserError("--latents_cache_dir is only used with --cache_latents_to_disk; add --cache_latents_to_disk")
    if not args.cache_latents_to_disk:
        return None
    if args.no_cache:
        raise UserError("--no_cache and --cache_latents_to_disk contradict each other; keep one")
    folder = Path(args.latents_cache_dir).expanduser() if args.latents_cache_dir else diskcache.default_dir()
    for flag in ("train_data_dir", "instance_data_dir", "class_data_dir", "validation_data_dir"):
        data = getattr(args, flag, None)
        if data and folder.resolve().is_relative_to(Path(data).expanduser().resolve()):
            raise UserError(f"--latents_cache_dir {folder} is inside --{flag} {data}, and sdlora never writes into "
                            f"a data folder; choose a folder outside it")
    check_writable(folder, "--latents_cache_dir")
    return folder


def _check_sampling(args, resolution: int, multiple: int) -> tuple[prompts.SamplePrompt, ...]:
    """The --sample_prompts file, read and checked now, so a bad line never stops a run half-way; `multiple`: what
    a sampled side must be a multiple of (models.sample_multiple)."""
    _positive("sample_every_n_steps", args.sample_every_n_steps)
    _positive("sample_every_n_epochs", args.sample_every_n_epochs)
    if not args.sample_prompts:
        for flag in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first"):
            if getattr(args, flag):
                raise UserError(f"--{flag} needs --sample_prompts FILE, the prompts to sample (one per line)")
        return ()
    return prompts.read(args.sample_prompts, resolution, multiple)


def _check_report_to(report_to: str, hub_token: str | None) -> str:
    if report_to == "all":
        report_to = "tensorboard" if importlib.util.find_spec("wandb") is None else "all"
    if report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError("--report_to wandb needs the wandb package: pip install wandb (or use --report_to tensorboard)")
    if report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None \
            and importlib.util.find_spec("tensorboardX") is None:
        raise UserError("--report_to tensorboard needs tensorboard: pip install tensorboard (or --report_to none)")
    if hub_token and report_to in ("wandb", "all"):
        raise UserError("--hub_token together with --report_to wandb would expose the token in wandb's logged "
                        "config; use `hf auth login` or HF_TOKEN instead")
    return report_to


def _check_devices(args, mixed_precision: str | None):
    import torch

    cuda = torch.cuda.is_available()
    if mixed_precision == "fp16" and not cuda:
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")
    if args.enable_xformers_memory_efficient_attention:
        if importlib.util.find_spec("xformers") is None:
            raise UserError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                            "(pip install xformers, CUDA only); PyTorch's SDPA attention is used by default")
        if not cuda:
            raise UserError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; drop the flag on CPU")
    if getattr(args, "compile", False):
        _check_compiler(cuda)
    quantize.check(args.quantize_base, cuda)
    if args.quantize_base == "int8" and args.lora_type == "dora" and not cuda:
        # On CPU bitsandbytes trains 8-bit layers through MatMul8bitFp; after peft's DoRA has dequantized the weight
        # for its norm, the layer's 8-bit state has no scales and the second step fails with an AttributeError
        # (bitsandbytes 0.50.2, peft 0.21.2; not tried on a GPU, which runs MatMul8bitLt instead)
        raise UserError("--lora_type dora can't be used with --quantize_base int8 on CPU (peft's DoRA breaks "
                        "bitsandbytes' 8-bit layers there); use --quantize_base nf4")
    if args.use_8bit_adam:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("--use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes; needs a CUDA GPU)")
        if not cuda:
            raise UserError("--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit optimizers); drop the flag on CPU")


def _check_compiler(cuda: bool):
    """--compile's inductor backend builds C++ kernels on CPU (Triton ones on GPU): without a compiler it would
    fail at the first step, after the models load."""
    import shutil

    if cuda:
        if importlib.util.find_spec("triton") is None:
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
