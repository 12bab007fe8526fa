"""Settings of the optimisation: learning rate and its schedule, the loss's weighting, the optimizer and its
arguments, LoRA+."""
from __future__ import annotations

from dataclasses import dataclass

from .declare import MUST_MATCH, OPTIONAL, setting
from .declare import LR_SCHEDULERS


@dataclass(frozen=True, kw_only=True)
class OptimSettings:
    learning_rate: float = setting(1e-4, "the LoRA's learning rate", resume=MUST_MATCH, card="learning rate",
                                   header="ss_learning_rate")
    scale_lr: bool = setting(False, "multiply the learning rate by batch size x accumulation x processes")
    text_encoder_lr: float | None = setting(help="default: --learning_rate", resume=MUST_MATCH)
    lr_scheduler: str = setting("constant", "the learning rate's schedule", choices=LR_SCHEDULERS, resume=MUST_MATCH,
                                card="LR scheduler")
    lr_warmup_steps: int = setting(500, "steps of linear warm-up (the *_with_warmup and decaying schedulers)",
                                   resume=MUST_MATCH)
    lr_num_cycles: int = setting(1, "cosine_with_restarts: the number of hard restarts", resume=MUST_MATCH)
    lr_power: float = setting(1.0, "polynomial: the power", resume=MUST_MATCH)
    snr_gamma: float | None = setting(help="Min-SNR loss weighting with this gamma, e.g. 5.0 (default: off)",
                                      resume=MUST_MATCH)
    noise_offset: float = setting(0.0, "noise offset, e.g. 0.05 (darker darks, brighter lights)", resume=MUST_MATCH)
    use_8bit_adam: bool = setting(False, "bitsandbytes' 8-bit AdamW (a CUDA GPU)", resume=MUST_MATCH)
    adam_beta1: float = setting(0.9, "AdamW's beta1", resume=MUST_MATCH)
    adam_beta2: float = setting(0.999, "AdamW's beta2", resume=MUST_MATCH)
    adam_weight_decay: float = setting(1e-2, "AdamW's weight decay", resume=MUST_MATCH)
    adam_weight_decay_text_encoder: float | None = setting(
        help="weight decay of the text encoders' LoRA (default: --adam_weight_decay)", resume=OPTIONAL)
    adam_epsilon: float = setting(1e-8, "AdamW's epsilon", resume=MUST_MATCH)
    max_grad_norm: float = setting(1.0, "gradients are clipped to this norm", resume=MUST_MATCH)
    optimizer: str | None = setting(
        help="the optimizer (default: AdamW), by diffusers' name (adamw, prodigy) or kohya's --optimizer_type (AdamW, "
             "AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, Prodigy, Adafactor, AdamWScheduleFree, RAdamScheduleFree, "
             "CAME, SGDNesterov) or any module.Class; any but AdamW: pip install \"sdlora[optimizers]\"",
        aliases=("optimizer_type",), resume=OPTIONAL, card="optimizer", header="ss_optimizer")
    optimizer_args: tuple | None = setting(
        help="the optimizer's keyword arguments as key=value (Python literals, kohya's --optimizer_args), e.g. "
             "weight_decay=0.01 betas=(0.9,0.99); they override the --adam_* and --prodigy_* flags",
        nargs="*", metavar="KEY=VALUE", resume=OPTIONAL, card="optimizer arguments")
    unet_lr: float | None = setting(help="the UNet LoRA's learning rate (kohya's; default: --learning_rate)",
                                    resume=OPTIONAL, header="ss_unet_lr")
    prodigy_beta3: float | None = setting(help="Prodigy's beta3 (step size coefficient; default: sqrt(beta2))",
                                          resume=OPTIONAL)
    prodigy_decouple: bool = setting(True, "Prodigy: AdamW-style decoupled weight decay (true/false)",
                                     resume=OPTIONAL)
    prodigy_use_bias_correction: bool = setting(True, "Prodigy: Adam's bias correction (true/false)",
                                                resume=OPTIONAL)
    prodigy_safeguard_warmup: bool = setting(True, "Prodigy: leave the LR out of the D estimate during warm-up "
                                                   "(true/false)", resume=OPTIONAL)
    loraplus_lr_ratio: float | None = setting(
        help="LoRA+: the LoRA B (up) matrices learn this many times faster than A, e.g. 16 (peft's LoRA+ groups)",
        resume=OPTIONAL, header="ss_loraplus_lr_ratio")
    loraplus_unet_lr_ratio: float | None = setting(help="LoRA+ ratio of the UNet (default: --loraplus_lr_ratio)",
                                                   resume=OPTIONAL, header="ss_loraplus_unet_lr_ratio")
    loraplus_text_encoder_lr_ratio: float | None = setting(
        help="LoRA+ ratio of the text encoders (default: --loraplus_lr_ratio)", resume=OPTIONAL,
        header="ss_loraplus_text_encoder_lr_ratio")
