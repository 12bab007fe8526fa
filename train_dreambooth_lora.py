#!/usr/bin/env python
"""DreamBooth LoRA, with prior preservation: the recipe is sdlora/recipes/dreambooth.py (`--help` lists its flags)."""
from sdlora.recipes.dreambooth import main

if __name__ == "__main__":
    raise SystemExit(main())
