"""The training configuration: every setting the loop reads, declared once with its default and its help.

A field made with `setting(...)` is also a command-line flag of the same name (or metadata "flag"): the CLI
generates the flag from the field (sdlora/cli/flags.py), so its default and help live here only. Tags in the
metadata say what else a setting is: "resume" ("must match" / "optional": recorded in checkpoints, see
fields_tagged), "card" (the model card's label for it) and "header" (its safetensors header keys).
`checks.check` resolves and validates the settings a command line gave, before any model loads.
"""
from __future__ import annotations

from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..data.buckets import Bucketing
from ..errors import UserError
from ..lora.inject import UNET_TARGETS
from ..quantize import MODES as QUANTIZE_MODES
from . import prompts

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MUST_MATCH, OPTIONAL = "must match", "optional"  # the "resume" tag's values


def setting(default: Any = None, help: str = "", **meta) -> Field:
    """A field that is a flag: `default` and `help` as --help shows them; `meta` holds argparse's extras (flag,
    aliases, choices, metavar, required) and the tags (resume, card, header)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # the base model
    base_name: str | None = setting(help="Hub id, local diffusers folder, or 'sdlora-tiny' (the bundled tiny model)",
                                    flag="pretrained_model_name_or_path", required=True, resume=MUST_MATCH,
                                    card="base model", header="ss_sd_model_name")
    base: str | None = None  # resolved: a loadable folder or Hub id
    family: str = "sd1"  # resolved from the base's config files: "sd1", "sd2" or "sdxl" (models.family_of)
    revision: str | None = setting(help="the base model's revision on the Hub (a branch, tag or commit)",
                                   resume=MUST_MATCH)
    variant: str | None = setting(help="weights variant, e.g. fp16", resume=MUST_MATCH)
    cache_dir: str | None = setting(help="where downloaded models are kept (default: the Hugging Face cache)")
    allow_pickle: bool = setting(False, "allow loading .bin (pickle) weights when no safetensors exist; only for "
                                        "models you trust")
    prediction_type: str | None = setting(
        help="default: the base's scheduler config (v_prediction for SD 2.x 768-v bases)",
        choices=["epsilon", "v_prediction"], resume=MUST_MATCH)
    pretrained_vae_model_name_or_path: str | None = setting(  # resolved: a loadable folder or Hub id
        help="a VAE to train with instead of the base's, e.g. madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE "
             "overflows in fp16, so it is kept in fp32 otherwise)", resume=OPTIONAL, card="VAE", header="ss_vae_name")
    zero_terminal_snr: bool = setting(
        False, "rescale the noise schedule to zero terminal SNR (kohya; diffusers' rescale_betas_zero_snr); "
               "for v-prediction", resume=OPTIONAL, card="zero terminal SNR", header="ss_zero_terminal_snr")
    # the run
    output_dir: Path | None = setting(help="where the LoRA, its model card, samples and checkpoints are written "
                                           "(default: %(default)s)")  # each recipe has its own default
    overwrite_output_dir: bool = setting(
        False, "run in an --output_dir that already holds files: an earlier sdlora run's LoRA, card and samples there "
               "are replaced; files sdlora did not write are left as they are (one named like a file the run writes "
               "stops it before it starts)")
    inputs: tuple[Path, ...] = ()  # resolved: folders and files the flags name to read (or cache into)
    logging_dir: str = setting("logs", "relative to --output_dir")
    seed: int | None = setting(help="random seed (default: a random one, drawn and recorded in the checkpoints and "
                                    "the file)", card="seed", header="ss_seed")
    resume_from_checkpoint: str | None = setting(help="'latest' or a checkpoint-N path")
    # data and batches
    resolution: int | None = setting(  # resolved: the flag, else the base's own size
        help="default: the base's own size, its UNet's sample_size x the VAE's downsampling (512 for SD 1.5, 1024 for "
             "SDXL, 32 for sdlora-tiny)", resume=MUST_MATCH, card="resolution",
        header=("ss_resolution", "modelspec.resolution"))
    center_crop: bool = setting(False, "centre crops (default: random crops, as diffusers)", resume=MUST_MATCH)
    random_crop: bool = setting(False, "kohya's flag: random crops, the default here")
    random_flip: bool = setting(False, "flip half the images (--flip_aug: kohya)", aliases=["flip_aug"],
                                resume=MUST_MATCH)
    # Batch 1 at 512 px fits 11 GB-class GPUs (raise it, or --gradient_accumulation_steps, with more memory).
    train_batch_size: int = setting(1, "images per step in each process", resume=MUST_MATCH, card="batch size",
                                    header="ss_train_batch_size")
    num_train_epochs: int = setting(1, "passes over the data (--max_train_steps, when given, decides instead)")
    max_train_steps: int | None = setting(help="optimizer steps to train (default: from --num_train_epochs)")
    gradient_accumulation_steps: int = setting(1, "batches per optimizer step", resume=MUST_MATCH,
                                               card="gradient accumulation")
    dataloader_num_workers: int = setting(0, "data-loading worker processes (0: in the main process)")
    no_cache: bool = setting(False, "don't cache VAE latents / text embeddings (they are cached automatically when "
                                    "possible)")
    cache_latents_to_disk: bool = setting(
        False, "keep cached VAE latents in files under --latents_cache_dir, read per batch and reused by later runs, "
               "instead of in RAM (kohya's flag; for data sets whose latents don't fit in RAM)")
    latents_cache_dir: Path | None = setting(  # resolved: the flag, else diskcache.default_dir(); None without it
        help="where --cache_latents_to_disk keeps them (default: $XDG_CACHE_HOME/sdlora/latents, else "
             "~/.cache/sdlora/latents)", metavar="DIR")
    pre_compute_text_embeddings: bool = setting(
        False, "encode the prompts once and release the text encoder (automatic when it is frozen)")
    tokenizer_max_length: int | None = setting(help="tokens per prompt (default: the tokenizer's own, 77)",
                                               resume=MUST_MATCH)
    text_encoder_use_attention_mask: bool = setting(False, "pass the prompts' attention mask to the text encoder",
                                                    resume=MUST_MATCH)
    # aspect-ratio buckets (kohya's flags), resolved into `bucketing`
    no_bucket: bool = setting(False, "square --resolution crops instead of aspect-ratio buckets (buckets are on by "
                                     "default)")
    enable_bucket: bool = setting(False, "accepted for kohya commands; buckets are the default")
    min_bucket_reso: int | None = setting(help="smallest bucket side (default: resolution/2)")
    max_bucket_reso: int | None = setting(help="largest bucket side (default: 2 x resolution)")
    bucket_reso_steps: int | None = setting(help="bucket sides are multiples of this (default: the model's, 64 for SD)")
    bucket_no_upscale: bool = setting(False, "images smaller than resolution² train at their own size (floored to "
                                             "whole steps)")
    bucketing: Bucketing | None = field(default=None, metadata={"resume": MUST_MATCH})  # resolved
    # masked loss, held-out loss
    masked_loss: bool = setting(False, "weight the loss by a mask: the image's alpha channel, or its file in "
                                       "--mask_dir (white = learn)", aliases=["alpha_mask"], resume=MUST_MATCH,
                                card="masked loss")
    mask_dir: Path | None = setting(help="masks named like their images (any image format)")
    validation_split: float | None = setting(help="hold this fraction of the training images out to measure a "
                                                  "validation loss")
    validation_data_dir: Path | None = setting(help="a folder of held-out images (and captions)")
    validation_loss_steps: int | None = setting(help="compute the held-out loss every N steps (default: every epoch "
                                                     "and at the end)")
    # optimisation
    learning_rate: float = setting(1e-4, "the LoRA's learning rate", resume=MUST_MATCH, card="learning rate",
                                   header="ss_learning_rate")
    scale_lr: bool = setting(False, "multiply the learning rate by batch size x accumulation x processes")
    text_encoder_lr: float | None = setting(help="default: --learning_rate", resume=MUST_MATCH)
    lr_scheduler: str = setting("constant", "the learning rate's schedule", choices=LR_SCHEDULERS, resume=MUST_MATCH,
                                card="LR scheduler")
    lr_warmup_steps: int = setting(500, "steps of linear warm-up (the *_with_warmup and decaying schedulers)",
                                   resume=MUST_MATCH)
    lr_num_cycles: int = setting(1, "cosine_with_restarts: the number of hard restarts", resume=MUST_MATCH)
    lr_power: float = setting(1.0, "polynomial: the power", resume=MUST_MATCH)
    snr_gamma: float | None = setting(help="Min-SNR loss weighting with this gamma, e.g. 5.0 (default: off)",
                                      resume=MUST_MATCH)
    noise_offset: float = setting(0.0, "noise offset, e.g. 0.05 (darker darks, brighter lights)", resume=MUST_MATCH)
    use_8bit_adam: bool = setting(False, "bitsandbytes' 8-bit AdamW (a CUDA GPU)", resume=MUST_MATCH)
    adam_beta1: float = setting(0.9, "AdamW's beta1", resume=MUST_MATCH)
    adam_beta2: float = setting(0.999, "AdamW's beta2", resume=MUST_MATCH)
    adam_weight_decay: float = setting(1e-2, "AdamW's weight decay", resume=MUST_MATCH)
    adam_weight_decay_text_encoder: float | None = setting(
        help="weight decay of the text encoders' LoRA (default: --adam_weight_decay)", resume=OPTIONAL)
    adam_epsilon: float = setting(1e-8, "AdamW's epsilon", resume=MUST_MATCH)
    max_grad_norm: float = setting(1.0, "gradients are clipped to this norm", resume=MUST_MATCH)
    # speed and memory
    mixed_precision: str | None = setting(  # resolved: the flag, else $ACCELERATE_MIXED_PRECISION
        help="default: accelerate's config / `accelerate launch --mixed_precision`", choices=["no", "fp16", "bf16"],
        card="mixed precision", header="ss_mixed_precision")
    precision_chosen: bool = False  # resolved: --mixed_precision given, so the log states it without advice against it
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, slower "
                                                  "steps")
    enable_xformers_memory_efficient_attention: bool = setting(
        False, "xformers' attention (CUDA only; PyTorch's SDPA attention is the default)")
    compile: bool = setting(False, "torch.compile the UNet's training steps (the first step compiles; slower on the "
                                   "CPUs measured, see the README)")
    allow_tf32: bool = setting(False, "TF32 matrix products on Ampere and newer GPUs (faster, slightly less exact)")
    quantize_base: str = setting(
        "none", "QLoRA-style: keep the UNet's frozen Linear weights in 8 bits (int8: bitsandbytes' LLM.int8) or 4 bits "
                "(nf4: QLoRA's NormalFloat4) while the LoRA trains in fp32; convolutions stay as they are. Needs "
                "bitsandbytes (a CUDA GPU, or an x86-64 CPU with AVX2). Saves memory, not time; the saved LoRA is the "
                "same kind of file (see the README)", choices=QUANTIZE_MODES, resume=OPTIONAL, card="quantized base",
        header="sdlora_quantize_base")
    # LoRA
    rank: int = setting(4, "the LoRA's rank", resume=MUST_MATCH, card="rank", header="ss_network_dim")
    lora_alpha: float | None = setting(help="default: equal to --rank (scale 1)",  # resolved: --rank when not given
                                       resume=MUST_MATCH, card="alpha", header="ss_network_alpha")
    lora_dropout: float = setting(0.0, "dropout on the LoRA layers' input", resume=MUST_MATCH)
    lora_type: str = setting(
        "lora", "dora: weight-decomposed LoRA (peft's use_dora, diffusers' --use_dora): each output channel's "
                "magnitude trained apart from its direction; loha / lokr: LyCORIS's Hadamard / Kronecker product "
                "layers (peft's LoHa/LoKr; --rank is their rank, --lora_alpha their alpha). LoHa/LoKr files load in "
                "ComfyUI, A1111/Forge and sdlora, not in diffusers' load_lora_weights; adalora: ranks pruned during "
                "training from --adalora_init_r down to an average of --rank per layer (peft's AdaLoRA), saved as "
                "plain LoRA at each layer's final rank", choices=["lora", "dora", "loha", "lokr", "adalora"],
        resume=MUST_MATCH, card="LoRA type", header=("ss_network_module", "ss_network_args"))
    adalora_init_r: int | None = setting(help="AdaLoRA's starting rank per layer (default: 1.5 x --rank)")
    adalora_tinit: int | None = setting(help="AdaLoRA: steps at the starting ranks before pruning (default: 10%% of "
                                             "the steps)")
    adalora_tfinal: int | None = setting(help="AdaLoRA: last steps trained at the final ranks (default: 20%% of the "
                                              "steps)")
    adalora_delta_t: int = setting(1, "AdaLoRA: prune every N steps")
    init_lora_weights: str = setting(
        "gaussian", "gaussian: the adapter starts as a no-op (A random, B zero); pissa / olora: A and B start from the "
                    "layer's principal singular vectors / a QR of it, the frozen weight keeps the rest (Linear layers "
                    "only); saved files hold the change from the unmodified base, at twice the rank",
        choices=["gaussian", "pissa", "olora"], resume=MUST_MATCH, card="LoRA init")
    use_rslora: bool = setting(
        False, "rank-stabilised LoRA: scale by alpha/sqrt(rank) instead of alpha/rank; the files record the "
               "equivalent alpha (alpha*sqrt(rank)), so every loader applies the same scale", resume=MUST_MATCH,
        card="rsLoRA")
    target_modules: tuple[str, ...] = setting(  # the flag: comma-separated
        tuple(UNET_TARGETS), "comma-separated UNet module names to adapt (default: %(default)s)", resume=MUST_MATCH,
        card="target modules", header="sdlora_target_modules")
    train_text_encoder: bool = setting(
        False, "also train LoRA on the CLIP text encoder's q/k/v/out projections (both of SDXL's)", resume=MUST_MATCH,
        card="text encoder LoRA", header="sdlora_train_text_encoder")
    save_precision: str = setting("fp32", "the saved LoRA's precision", choices=["fp32", "fp16", "bf16"],
                                  card="saved precision")
    # checkpoints, logs, validation, sharing
    checkpointing_steps: int = setting(500, "save a checkpoint every N steps (--resume_from_checkpoint continues "
                                            "from one)")
    checkpoints_total_limit: int | None = setting(help="keep only the newest N checkpoints (default: all)")
    report_to: str = setting("tensorboard", "where the losses are logged",
                             choices=["tensorboard", "wandb", "none", "all"])
    validation_prompt: str | None = setting(help="a prompt to draw every --validation_epochs epochs while training")
    num_validation_images: int = setting(4, "images drawn per --validation_prompt round")
    validation_epochs: int = setting(1, "draw the --validation_prompt every N epochs")
    sample_prompts: tuple[prompts.SamplePrompt, ...] = ()  # resolved: read from sample_prompts_file
    sample_prompts_file: str | None = setting(
        help="text file, one prompt per line with kohya's options (--n negative, --w width, --h height, --s steps, "
             "--l guidance, --d seed); PNGs and a grid per round in output_dir/samples/. Without "
             "--sample_every_n_steps/--sample_every_n_epochs: one round at the end", flag="sample_prompts",
        metavar="FILE")
    sample_every_n_steps: int | None = setting(  # with neither cadence, one round at the end
        help="sample the --sample_prompts every N optimizer steps", metavar="N")
    sample_every_n_epochs: int | None = setting(
        help="sample the --sample_prompts every N epochs (with --sample_every_n_steps: at both)", metavar="N")
    sample_at_first: bool = setting(False, "also sample the --sample_prompts before training starts (in a new run: "
                                           "the untrained LoRA)")
    push_to_hub: bool = setting(False, "upload the LoRA, its kohya file and model card to the Hub at the end")
    hub_model_id: str | None = setting(help="the Hub repository to upload to (default: the --output_dir's name)")

    def tracker_config(self) -> dict:
        """What the experiment trackers record (plain values only; the token is never part of a config)."""
        return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in asdict(self).items() if v is not None and k != "sample_prompts"}  # the file is there


def flag_name(f: Field) -> str | None:
    """The flag a field is (without dashes), or None for a resolved-only field."""
    return f.metadata.get("flag", f.name) if "help" in f.metadata else None


def from_flags(values: Mapping[str, Any]) -> TrainConfig:
    """The settings among `values` (flag name -> value, as a parsed command line has them), unresolved and
    unchecked (`checks.check` does both); settings a recipe has no flag for keep their defaults."""
    given = {f.name: values[flag_name(f)] for f in fields(TrainConfig) if flag_name(f) in values}
    return TrainConfig(**given)


def fields_tagged(tag: str) -> dict[str, Any]:
    """{field name: tag value} of the fields carrying `tag` ("resume", "card", "header"), in declaration order."""
    return {f.name: f.metadata[tag] for f in fields(TrainConfig) if tag in f.metadata}


def default_of(name: str) -> Any:
    """A field's declared default (e.g. an "optional" resume setting's value when a checkpoint lacks it)."""
    return next(f.default for f in fields(TrainConfig) if f.name == name)


def adalora_schedule(config, max_steps: int) -> tuple[int, int, int]:
    """(init_r, tinit, tfinal) for a run of `max_steps`; a schedule that leaves no step to prune in is one line."""
    init_r = config.adalora_init_r or config.rank + max(1, config.rank // 2)
    tinit = max_steps // 10 if config.adalora_tinit is None else config.adalora_tinit
    tfinal = max_steps // 5 if config.adalora_tfinal is None else config.adalora_tfinal
    if tinit >= max_steps - tfinal:
        raise UserError(f"--adalora_tinit {tinit} and --adalora_tfinal {tfinal} leave no step of the {max_steps} to "
                        "prune ranks in; lower them or train longer")
    return init_r, tinit, tfinal
