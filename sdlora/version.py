"""sdlora's version, in a module of its own so that modules recording it (PNG parameters, LoRA metadata, model
cards) need not import the package's `__init__`."""
__version__ = "0.1.0"
