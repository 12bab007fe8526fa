"""sdlora: Stable Diffusion LoRA training and inference on top of diffusers + peft."""
__version__ = "0.1.0"

import warnings

from .errors import UserError  # noqa: E402,F401

# diffusers >= 0.36 renamed torch_dtype to dtype; we pass the name every supported version knows.
warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated.*", category=FutureWarning)


def __getattr__(name):  # lazy, so `import sdlora` doesn't pull in torch/diffusers
    if name == "load_pipeline":
        from .pipeline import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'sdlora' has no attribute {name!r}")
