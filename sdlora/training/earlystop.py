"""Early stopping on the validation loss (--early_stopping_patience N): the weights of the lowest loss are kept (in
memory and in checkpoints), the run ends after N evaluations without a new lowest, and the output is the lowest
one's weights, with the last step's saved beside them."""
from __future__ import annotations

import logging

import torch

from ..errors import UserError

log = logging.getLogger("sdlora")
LAST_NAME = "pytorch_lora_weights_last.safetensors"  # the last step's weights, beside the best one's


def check(config) -> None:
    """--early_stopping_patience needs held-out images, before any model loads."""
    n = config.early_stopping_patience
    if n is not None and n < 1:
        raise UserError(f"--early_stopping_patience must be >= 1 (got {n})")
    if n and not (config.validation_split or config.validation_data_dir):
        raise UserError("--early_stopping_patience needs held-out images: add --validation_split 0.1 or "
                        "--validation_data_dir DIR")


class EarlyStop:
    """The weights of the lowest validation loss so far and the evaluations since it (main process)."""

    def __init__(self, patience: int):
        self.patience, self.since, self.best = patience, 0, None

    def record(self, improved: bool, params: list) -> None:
        """After an evaluation (with the weights it evaluated in `params`)."""
        if improved:
            self.since, self.best = 0, [p.detach().clone() for p in params]
        else:
            self.since += 1

    def due(self, accelerator) -> bool:
        """Whether the run stops now (the same answer on every process)."""
        stop = self.since >= self.patience
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            stop = broadcast_object_list([stop])[0]
        return stop

    def restore_best(self, params: list) -> None:
        """Put the lowest loss's weights into `params` (the output is written from them)."""
        with torch.no_grad():
            for p, b in zip(params, self.best):
                p.copy_(b)

    def state_dict(self) -> dict:
        return {"since": self.since, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.since, self.best = int(state.get("since", 0)), state.get("best")
