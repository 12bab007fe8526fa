"""sdlora: Stable Diffusion LoRA training and inference on top of diffusers + peft.

The public API is what these names and the documented modules export; everything below is lazy so
`import sdlora` doesn't pull in torch or diffusers:

    from sdlora import load_pipeline, sample, grid
    pipe = load_pipeline(["my-lora:0.8"])              # base model from the LoRA's card
    images = sample(pipe, ["a photo of sks dog"] * 4, seeds=[0, 1, 2, 3])
"""
import warnings

from . import version
from .errors import UserError  # noqa: E402,F401

__version__ = version.__version__

# diffusers >= 0.36 renamed torch_dtype to dtype; we pass the name every supported version knows.
warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated.*", category=FutureWarning)

_PIPELINE = ("load_pipeline", "load_adapters", "Adapters", "generate", "sample", "grid", "fuse_loras", "unfuse_loras")


def __getattr__(name):
    if name in _PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    if name == "load_lora":
        from .lora.formats import load_lora

        return load_lora
    raise AttributeError(f"module 'sdlora' has no attribute {name!r}")
