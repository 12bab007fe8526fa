"""sdlora: Stable Diffusion LoRA training and inference on top of diffusers + peft."""
__version__ = "0.1.0"

from .errors import UserError  # noqa: E402,F401
