"""The training recipes, one module each: its flags (`parser`), its data (`rows`, `make_recipe`) and `main`, which
the top-level scripts and `sdlora train NAME` run."""
from . import dreambooth, text_to_image

RECIPES = {"text-to-image": text_to_image, "dreambooth": dreambooth}
