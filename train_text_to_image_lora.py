#!/usr/bin/env python
"""LoRA on image–caption pairs: the recipe is sdlora/recipes/text_to_image.py (`--help` lists its flags)."""
from sdlora.recipes.text_to_image import main

if __name__ == "__main__":
    raise SystemExit(main())
