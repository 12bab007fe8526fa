"""sdlora: Stable Diffusion LoRA training and inference on top of diffusers + peft."""
__version__ = "0.1.0"

import warnings

from .errors import UserError  # noqa: E402,F401

# diffusers >= 0.36 renamed torch_dtype to dtype; we pass the name every supported version knows.
warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated.*", category=FutureWarning)
