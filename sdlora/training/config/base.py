"""Settings of the base model: which one, and how it is read."""
from __future__ import annotations

from dataclasses import dataclass

from .declare import MUST_MATCH, OPTIONAL, setting


@dataclass(frozen=True, kw_only=True)
class BaseSettings:
    base_name: str | None = setting(help="Hub id, local diffusers folder, a single-file checkpoint (.safetensors, local "
                                         "or a Hub file path such as owner/repo/model.safetensors), or 'sdlora-tiny' "
                                         "(the bundled tiny model)",
                                    flag="pretrained_model_name_or_path", required=True, resume=MUST_MATCH,
                                    card="base model", header="ss_sd_model_name")
    base: str | None = None  # resolved: a loadable folder or Hub id, or a single-file checkpoint's local path
    base_config: str | None = setting(
        help="for a single-file base: a diffusers folder or Hub id of the same family whose configs and tokenizers "
             "it loads with (only those files are read; default: the repo diffusers picks, which needs the Hub)",
        metavar="DIR_OR_ID")  # resolved: the folder or Hub id the configs are read from (None for a folder base)
    base_why: str | None = None  # resolved: what in a single file set the prediction type / zero terminal SNR
    family: str = "sd1"  # resolved from the base's config files: "sd1", "sd2" or "sdxl" (models.family_of)
    revision: str | None = setting(help="the base model's revision on the Hub (a branch, tag or commit)",
                                   resume=MUST_MATCH)
    variant: str | None = setting(help="weights variant, e.g. fp16", resume=MUST_MATCH)
    cache_dir: str | None = setting(help="where downloaded models are kept (default: the Hugging Face cache)")
    allow_pickle: bool = setting(False, "allow loading .bin (pickle) weights when no safetensors exist; only for "
                                        "models you trust")
    prediction_type: str | None = setting(
        help="default: the base's scheduler config (v_prediction for SD 2.x 768-v bases)",
        choices=["epsilon", "v_prediction"], resume=MUST_MATCH)
    clip_skip: int | None = setting(
        help="condition on the N-th last text-encoder layer (kohya's and A1111's clip skip: 1 is the last, 2 the one "
             "before, which most SD 1.x anime finetunes expect); SD 1.x/2.x; recorded for generate and samples",
        resume=OPTIONAL, card="clip skip", header="ss_clip_skip")
    pretrained_vae_model_name_or_path: str | None = setting(  # resolved: a loadable folder or Hub id
        help="a VAE to train with instead of the base's, e.g. madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE "
             "overflows in fp16, so it is kept in fp32 otherwise)", resume=OPTIONAL, card="VAE", header="ss_vae_name")
    zero_terminal_snr: bool = setting(
        False, "rescale the noise schedule to zero terminal SNR (kohya; diffusers' rescale_betas_zero_snr); "
               "for v-prediction", resume=OPTIONAL, card="zero terminal SNR", header="ss_zero_terminal_snr")
