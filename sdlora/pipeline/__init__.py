"""Inference: an unmodified StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL bases) with DPM++ and
LoRAs stacked through diffusers/peft.

loading: the base pipeline and `load_adapters`/`load_pipeline`; adapters: the LoRA stack (`Adapters`), its checks
and fusing; images: sizes, `generate`, `sample`, `grid`; pnginfo: what each PNG records.
"""
from .adapters import COMPONENTS, Adapters, base_family, check_fits, fuse_loras, lora_weight, parse_spec, unfuse_loras
from .images import MAX_SIZE_FACTOR, PIPELINE_MULTIPLE, check_size, generate, grid, image_size, sample, size_limits
from .loading import (PIPELINES, SCHEDULERS, assemble, base_from, check_base_size, load_adapters, load_base,
                      load_pipeline, set_scheduler)
from .pnginfo import a1111_text, image_params, image_paths, png_info, write_images

__all__ = [
    "COMPONENTS", "Adapters", "base_family", "check_fits", "fuse_loras", "lora_weight", "parse_spec", "unfuse_loras",
    "MAX_SIZE_FACTOR", "PIPELINE_MULTIPLE", "check_size", "generate", "grid",
    "image_size", "sample", "size_limits", "PIPELINES", "SCHEDULERS", "assemble", "base_from", "check_base_size",
    "load_adapters", "load_base", "load_pipeline", "set_scheduler", "a1111_text", "image_params", "image_paths",
    "png_info", "write_images",
]
