"""The exponential moving average of the LoRA weights (--use_ema): diffusers' EMAModel over the trained parameters,
in fp32 (the LoRA parameters' own dtype), updated after each optimizer step, in checkpoints for an exact resume,
and swapped in for validation, samples and the saved output."""
from __future__ import annotations

from contextlib import contextmanager

from ..errors import UserError

RAW_NAME = "pytorch_lora_weights_without_ema.safetensors"  # the trained weights, beside the EMA output


def params(parts: dict) -> list:
    """The trained parameters, in the order the EMA keeps their shadows."""
    return [p for c in parts.values() for p in c.params]


def create(config, parts: dict):
    """diffusers' EMAModel of the LoRA (None without --use_ema)."""
    if not config.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params(parts), decay=config.ema_decay, use_ema_warmup=config.ema_warmup, power=config.ema_power)


def load(ema, state: dict | None, path) -> None:
    """Put a checkpoint's EMA state into `ema`; a checkpoint without one (or of another LoRA) is one line."""
    if state is None:
        raise UserError(f"{path}: has no ema.pt (it was saved without --use_ema); resume without --use_ema")
    shadows = state.get("shadow_params") or []
    if len(shadows) != len(ema.shadow_params) or any(a.shape != b.shape for a, b in zip(shadows, ema.shadow_params)):
        raise UserError(f"{path}/ema.pt: its EMA does not fit this run's LoRA; the checkpoint is damaged")
    ema.load_state_dict(state)


@contextmanager
def swapped_in(ema, parts: dict):
    """The EMA weights in the LoRA for the time of a `with`, the trained ones back afterwards (bit for bit)."""
    if ema is None:
        yield
        return
    ps = params(parts)
    ema.store(ps)
    ema.copy_to(ps)
    try:
        yield
    finally:
        ema.restore(ps)
