"""Settings of which weights a run ends with: an exponential moving average of the LoRA (EMA), and early stopping
on the validation loss (the best step's weights)."""
from __future__ import annotations

from dataclasses import dataclass

from .declare import OPTIONAL, setting


@dataclass(frozen=True, kw_only=True)
class OutcomeSettings:
    use_ema: bool = setting(False, "keep an exponential moving average of the LoRA weights in fp32 (diffusers' "
                                   "EMAModel): it draws the validation and sample images and is saved as the output; "
                                   "the raw weights are saved beside it as "
                                   "pytorch_lora_weights_without_ema.safetensors",
                            resume=OPTIONAL, card="EMA")
    ema_decay: float = setting(0.9999, "EMA: the highest decay (EMAModel's decay; it warms up to it as "
                                       "(1 + step) / (10 + step), or with --ema_warmup)", resume=OPTIONAL)
    ema_warmup: bool = setting(False, "EMA: EMAModel's use_ema_warmup, decay 1 - (1 + step)^-power (up to "
                                      "--ema_decay)", resume=OPTIONAL)
    ema_power: float = setting(2 / 3, "EMA: the warm-up's power (--ema_warmup)", resume=OPTIONAL)
    early_stopping_patience: int | None = setting(
        help="stop after this many validation-loss evaluations without a new lowest, saving the lowest one's "
             "weights as the output and the last ones as pytorch_lora_weights_last.safetensors (needs "
             "--validation_split or --validation_data_dir; default: off)", resume=OPTIONAL)
