"""LoRA itself: peft injection for training, the file formats it is saved in, and tools over those files."""
