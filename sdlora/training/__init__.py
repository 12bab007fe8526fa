"""The one training loop and what it needs: the checked config, losses, checkpoints, the output folder, validation."""
