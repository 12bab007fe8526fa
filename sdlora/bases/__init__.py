"""Single-file base checkpoints (the original Stable Diffusion layout most community finetunes ship in): write one
from a diffusers folder (`ldm`), read what it is before any weights load (`detect`), load its components through
diffusers' single-file loading (`load`), and name it as A1111/Civitai do (`hashes`)."""
