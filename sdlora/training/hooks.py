"""The ways a caller follows or steers a training run (`loop.train(config, recipe, hooks)`): the UI, the CLI's
signal handling, benchmarks and examples use them instead of reaching into the loop."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Hooks:
    """Each hook is optional; every process calls them.

    on_step(step, logs): after every optimizer step; `logs` carries the losses, "lr", "max_steps" and "s_per_step"
        (the step's own time, without the sampling and saving after it).
    should_stop(): after every step; when it turns true (a string: why, for the log line) the run saves a
        checkpoint at the step it is on and `train` returns None, so `--resume_from_checkpoint latest` continues it.
    on_phase(name): when the run turns to "training", "validating", "sampling" or "saving".
    on_trainable(parts): once the LoRA is in place and the optimizer built, before any step: {"unet"[,
        "text_encoder"…]: run.Component}, each with the bare model (`.bare`) and its trainable `.params`.
    """
    on_step: Callable[[int, dict], None] | None = None
    should_stop: Callable[[], object] | None = None
    on_phase: Callable[[str], None] | None = None
    on_trainable: Callable[[dict], None] | None = None
