"""Settings of the noise and the loss, by kohya's names and with kohya's formulas (training/noise.py, losses.py):
multi-resolution noise, input perturbation, the timestep range, Huber losses and the SNR-based weightings."""
from __future__ import annotations

from dataclasses import dataclass

from .declare import OPTIONAL, setting


# Header tags only on settings that are None or False by default (output/facts.py leaves those out): a tag on one
# with another default would add its key to every run's header (kohya's ss_loss_type, ss_huber_*,
# ss_multires_noise_discount are therefore not written).
@dataclass(frozen=True, kw_only=True)
class NoiseSettings:
    multires_noise_iterations: int | None = setting(
        help="multi-resolution (pyramid) noise with this many levels, e.g. 6-10 (kohya's; default: off)",
        resume=OPTIONAL, header="ss_multires_noise_iterations")
    multires_noise_discount: float = setting(0.3, "multi-resolution noise: each level's weight is this to the "
                                                  "level's power", resume=OPTIONAL)
    ip_noise_gamma: float | None = setting(
        help="input perturbation: the noised latent gets this much extra noise the target leaves out, e.g. 0.1 "
             "(kohya's, arxiv.org/abs/2301.11706; default: off)", resume=OPTIONAL, header="ss_ip_noise_gamma")
    ip_noise_gamma_random_strength: bool = setting(
        False, "input perturbation at a random strength in [0, --ip_noise_gamma) each step", resume=OPTIONAL,
        header="ss_ip_noise_gamma_random_strength")
    min_timestep: int | None = setting(help="the lowest timestep trained (default: 0)", resume=OPTIONAL)
    max_timestep: int | None = setting(help="the timestep trained up to, excluded (default: the schedule's length)",
                                       resume=OPTIONAL)
    loss_type: str = setting("l2", "the denoising error: l2 (squared), l1, huber or smooth_l1 (kohya's, with "
                                   "--huber_schedule and --huber_c)", choices=["l2", "l1", "huber", "smooth_l1"],
                             resume=OPTIONAL)
    huber_schedule: str = setting("snr", "the Huber threshold over the timesteps: constant, exponential or snr",
                                  choices=["constant", "exponential", "snr"], resume=OPTIONAL)
    huber_c: float = setting(0.1, "the Huber threshold (--loss_type huber/smooth_l1)", resume=OPTIONAL)
    huber_scale: float = setting(1.0, "the Huber threshold's scale (constant and exponential schedules)",
                                 resume=OPTIONAL)
    debiased_estimation_loss: bool = setting(False, "weigh each sample's loss by 1/sqrt(SNR) (v-prediction: "
                                                    "1/(SNR+1)), kohya's debiased estimation", resume=OPTIONAL,
                                             header="ss_debiased_estimation")
    scale_v_pred_loss_like_noise_pred: bool = setting(
        False, "v-prediction: weigh the loss by SNR/(SNR+1), as an epsilon loss would be", resume=OPTIONAL)
    v_pred_like_loss: float | None = setting(
        help="add this times a v-prediction-like loss (the loss x (SNR+1)/SNR), kohya's", resume=OPTIONAL)
