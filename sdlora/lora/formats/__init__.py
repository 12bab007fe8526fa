"""LoRA file formats: read diffusers / peft / kohya (A1111, ComfyUI) files into one form, write any of them.

In memory a LoRA is ``{"<component>.<path>": Module(down, up, alpha)}`` where component is
``unet``, ``text_encoder`` or ``text_encoder_2`` and path is the diffusers module path. Text-encoder
paths use the classic ``text_model.…`` spelling that every file in the wild uses; `live_path`
maps them onto the installed transformers' module tree. kohya files of SDXL name UNet layers as
kohya's sd-scripts do, by the original (SGM) UNet (`sgm_pairs`). A module's weight change is
``up @ down * alpha / rank`` (conv: ``down`` holds the kernel, ``up`` is 1×1, as in kohya LoCon). A DoRA
module also has a magnitude per output channel: the layer's weight becomes ``m * V / |V|`` row by row, with
``V = W + up @ down * alpha / rank`` (peft's DoRA; kohya/LyCORIS files call it ``dora_scale``).

One module per file layout (`diffusers`, `peft`, `kohya`: detect / read / write, listed in `registry`), and what
they share: `layers` (the types), `names` (name maps), `checks` (what readers refuse), `reading` (keys to
checked layers), `peftconfig` (alphas and ranks from peft configs), `mmdit` (SD3's original layer names), `files` (finding and reading files),
`families`. This package only re-exports their public names; its modules import each other directly.
"""
from ..lycoris import NAMES as LYCORIS_NAMES
from ..lycoris import Product
from .diffusers import diffusers_tensors, to_shared
from .families import family, lora_family, unet_family
from .files import (PICKLE_BASE_HINT, PICKLE_SUFFIXES, WEIGHT_NAMES, WEIGHTS_NAME, looks_like_hub_id, read_tensors,
                    resolve_file)
from .kohya import network_header
from .layers import Lora, Module, peft_magnitude, with_modules
from .mmdit import sai_name
from .names import (canonical, clip_has_text_model, diffusers_keys, live_path, magnitude_key, sgm_pairs, swap_prefix,
                    unet_stem, unmangle)
from .peftconfig import lycoris_config_dict, peft_config_dict
from .registry import CODECS, FORMATS, check_output, detect_format, load_lora, output_files, parse, save_lora

__all__ = [
    "CODECS", "FORMATS", "LYCORIS_NAMES", "Lora", "Module", "PICKLE_BASE_HINT", "PICKLE_SUFFIXES", "Product",
    "WEIGHTS_NAME", "WEIGHT_NAMES", "canonical", "check_output", "clip_has_text_model", "detect_format",
    "diffusers_keys", "diffusers_tensors", "family", "live_path", "load_lora", "looks_like_hub_id", "lora_family",
    "lycoris_config_dict", "magnitude_key", "network_header", "output_files", "parse", "peft_config_dict",
    "peft_magnitude", "read_tensors", "resolve_file", "sai_name", "save_lora", "sgm_pairs", "swap_prefix", "to_shared",
    "unet_family", "unet_stem", "unmangle", "with_modules",
]
