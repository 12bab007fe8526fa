"""Settings of the rectified-flow objective and the three text encoders of Stable Diffusion 3 / 3.5 bases, named and
defaulted as diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py names them. Other families refuse them set
(SD3_ONLY, training/checks.py).
Tagged resume="optional" only (recorded when not at the default) and without card/header tags, so the checkpoints,
cards and headers of the earlier families stay as they were (--upcast_before_saving, which saves nothing different,
not even that)."""
from __future__ import annotations

from dataclasses import dataclass

from .declare import OPTIONAL, setting

# diffusers' SD3 script's --weighting_scheme choices (diffusers.training_utils reads them).
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


@dataclass(frozen=True, kw_only=True)
class FlowSettings:
    weighting_scheme: str = setting(
        "logit_normal", "SD3 bases: how training timesteps are drawn (logit_normal, mode: SD3's paper) and the loss "
                        "weighted (sigma_sqrt, cosmap); none: uniform, unweighted (diffusers' SD3 script)",
        choices=list(WEIGHTING_SCHEMES), resume=OPTIONAL)
    logit_mean: float = setting(0.0, "SD3 bases: mean of the logit-normal timestep density", resume=OPTIONAL)
    logit_std: float = setting(1.0, "SD3 bases: standard deviation of the logit-normal timestep density",
                               resume=OPTIONAL)
    mode_scale: float = setting(1.29, "SD3 bases: scale of the mode timestep density (--weighting_scheme mode)",
                                resume=OPTIONAL)
    precondition_outputs: int = setting(
        1, "SD3 bases: 1 (default): precondition the transformer's output as EDM does and regress the clean latent; "
           "0: regress the flow (noise - latent) directly (diffusers' SD3 script)", choices=[0, 1], resume=OPTIONAL)
    max_sequence_length: int = setting(77, "SD3 bases: T5 prompt tokens (diffusers' SD3 script; up to 256 for SD3.5)",
                                       resume=OPTIONAL)
    drop_t5: bool = setting(
        False, "SD3 bases: leave the T5-XXL encoder out (its tokens are zeros, as diffusers' StableDiffusion3Pipeline "
               "does with text_encoder_3=None): ~9 GB less in bf16, slightly weaker prompt following",
        resume=OPTIONAL)
    lora_layers: str | None = setting(
        help="SD3 bases: comma-separated transformer layers to adapt (diffusers' SD3 script; default: both streams' "
             "attention, attn.to_q/k/v/out.0 and attn.add_q/k/v_proj/to_add_out)", resume=OPTIONAL)
    lora_blocks: str | None = setting(
        help="SD3 bases: comma-separated transformer block numbers to adapt (default: all)", resume=OPTIONAL)
    upcast_before_saving: bool = setting(
        False, "SD3 bases: diffusers' SD3 script's flag, accepted as it is: sdlora saves the LoRA in fp32 whatever "
               "the training precision (--save_precision fp32, the default), so it changes nothing; refused with "
               "--save_precision fp16/bf16")  # saves nothing different: not recorded for a resume


# What another family refuses when set (--upcast_before_saving, which changes nothing anywhere, is accepted)
SD3_ONLY = tuple(f for f in FlowSettings.__dataclass_fields__ if f != "upcast_before_saving")
