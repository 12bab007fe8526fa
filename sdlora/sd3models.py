"""Loading a Stable Diffusion 3 / 3.5 base's parts (sd3base names them): the MMDiT, the three text encoders, their
tokenizers and the flow-matching schedule, through `models.load_model` (safetensors only unless --allow_pickle)."""
from __future__ import annotations

from . import models
from .errors import UserError
from .sd3base import TEXT_CLASSES


def load_transformer(base, revision=None, variant=None, cache_dir=None, dtype=None, allow_pickle=False):
    from diffusers import SD3Transformer2DModel

    return models.load_model(SD3Transformer2DModel, base, "transformer", allow_pickle, revision=revision,
                             variant=variant, cache_dir=cache_dir, torch_dtype=dtype)


def load_text_encoder(base, subfolder: str, revision=None, variant=None, cache_dir=None, dtype=None,
                      allow_pickle=False):
    import transformers

    return models.load_model(getattr(transformers, TEXT_CLASSES[subfolder]), base, subfolder, allow_pickle,
                             revision=revision, variant=variant, cache_dir=cache_dir, dtype=dtype)


def load_tokenizer(base, subfolder: str, revision=None, cache_dir=None):
    """CLIP's tokenizers, and T5's (its tokenizer_3 folder) as transformers' AutoTokenizer reads it."""
    from transformers import AutoTokenizer, CLIPTokenizer

    cls = AutoTokenizer if subfolder == "tokenizer_3" else CLIPTokenizer
    try:
        return cls.from_pretrained(base, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"{base}/{subfolder}: could not load ({str(e).splitlines()[0][:200]})") from None


def load_scheduler(base, revision=None, cache_dir=None):
    """The base's FlowMatchEulerDiscreteScheduler (its shift), as diffusers' SD3 script trains with it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", revision=revision,
                                                           cache_dir=cache_dir)
