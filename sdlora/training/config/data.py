"""Settings of the data: sizes and batches, aspect-ratio buckets, masks and held-out images."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .declare import MUST_MATCH, setting
from ...data.buckets import Bucketing


@dataclass(frozen=True, kw_only=True)
class DataSettings:
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
