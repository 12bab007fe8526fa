"""A single-file checkpoint written out as a diffusers folder (`sdlora convert-base FILE OUT_DIR`): the family's
unmodified pipeline assembled by diffusers' single-file loading (`load.pipeline`) and saved with `save_pretrained`,
its scheduler saying what the file's markers say (v-prediction, zero terminal SNR)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import detect, load


def write(base: str, out: str | Path, base_config: str | None = None, dtype=None, overwrite: bool = False,
          allow_pickle: bool = False, v_pred: bool = False, ztsnr: bool = False, cache_dir=None,
          token=None) -> tuple[Path, str, str]:
    """Write the single-file checkpoint `base` (local, or a Hub file path) as the diffusers folder `out`, whole or
    not at all; returns (the folder, the family, what decided the prediction type). Its configs and tokenizers come
    from `base_config` (or, with a network, the repo diffusers picks; see load.resolve_configs). `v_pred` / `ztsnr`
    say the model is v-prediction / zero terminal SNR where the file does not."""
    from .. import io

    out = Path(out).expanduser()
    if out.suffix.lower() in detect.SUFFIXES:
        raise UserError(f"{out}: from a single file, convert-base writes a diffusers folder; name a folder")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; choose another name or pass --overwrite")
    ckpt = load.locate(str(base), allow_pickle, cache_dir=cache_dir, token=token, flag="convert-base")
    configs = load.resolve_configs(ckpt, base_config, cache_dir, token)
    pipe = load.pipeline(str(ckpt.path), configs, ckpt.family, dtype, allow_pickle)
    scheduler, why = _scheduler_settings(ckpt, v_pred, ztsnr)
    if scheduler:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **scheduler)
    with io.atomic_dir(out) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return out, ckpt.family, why or f"the scheduler of {configs}"


def _scheduler_settings(ckpt: detect.Checkpoint, v_pred: bool, ztsnr: bool) -> tuple[dict, str]:
    """The scheduler-config changes the flags and the file's markers call for, and what said so."""
    changes = {}
    if v_pred or ckpt.prediction_type:
        changes["prediction_type"] = "v_prediction" if v_pred else ckpt.prediction_type
    if ztsnr or ckpt.zero_terminal_snr:
        changes["rescale_betas_zero_snr"] = True
    why = "--v-pred / --ztsnr" if v_pred or ztsnr else ckpt.why
    return changes, why
