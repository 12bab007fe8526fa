"""A single-file base's components loaded through diffusers' single-file loading (`from_single_file(config=…)` for
the UNet and VAE, its CLIP loader for the text encoders), each from only its own tensors, cast as they are read.

The configs and tokenizers come from a diffusers folder or Hub id of the same family (`--base_config`), or, with a
network, from the repo diffusers itself picks for the file (`fetch_diffusers_config`)."""
from __future__ import annotations

import functools
from pathlib import Path

from ..errors import UserError
from . import detect, ldm

# Each component's tensors in the file, by name prefix.
PREFIXES = {"unet": (ldm.UNET,), "vae": (ldm.VAE, "vae."),
            "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
            "text_encoder_2": ("conditioner.embedders.1.",)}
# What the configs flag is called in errors.
FLAG = "--base_config"


def locate(name: str, allow_pickle: bool = False, revision=None, cache_dir=None, token=None,
           flag: str = "--pretrained_model_name_or_path") -> detect.Checkpoint:
    """A local or Hub single-file checkpoint, downloaded if need be and described (`detect.read`); read once per
    process (the file's size and time are part of the key)."""
    local = Path(str(name)).expanduser()
    stamp = (local.stat().st_size, local.stat().st_mtime_ns) if local.is_file() else None
    return _locate(str(name), stamp, allow_pickle, revision, cache_dir, token, flag)


@functools.lru_cache(maxsize=8)
def _locate(name: str, stamp, allow_pickle: bool, revision, cache_dir, token, flag) -> detect.Checkpoint:
    if not Path(str(name)).expanduser().exists() and (hub := detect.hub_file(name)):
        from huggingface_hub import hf_hub_download

        repo, file, rev = hub
        try:
            name = hf_hub_download(repo, file, revision=rev or revision, cache_dir=cache_dir, token=token)
        except Exception as e:
            raise UserError(f"{flag} {name}: not a local file, and the Hub did not give it ({type(e).__name__}); "
                            f"check the path, or download it and give the local file") from None
    return detect.read(name, allow_pickle, flag)


def resolve(c, token=None) -> tuple[str, str] | None:
    """(local file, configs folder or id) for a run's settings `c` whose base is a single-file checkpoint, else
    None; --base_config with a folder base is one line."""
    if not detect.is_single_file(c.base_name):
        if c.base_config:
            raise UserError(f"--base_config is for single-file checkpoints; {c.base_name} is a folder or Hub id, "
                            f"which holds its own configs: drop --base_config")
        return None
    ckpt = locate(c.base_name, c.allow_pickle, c.revision, c.cache_dir, token)
    return str(ckpt.path), resolve_configs(ckpt, c.base_config, c.cache_dir, token)


def file_settings(c, token=None) -> dict:
    """A single-file base's v-prediction / zero-terminal-SNR markers (detect.markers) as the settings they stand
    for, where the flags do not say otherwise, and what said so (`base_why`, for the log); {} for a folder base."""
    if not detect.is_single_file(c.base_name):
        return {}
    ckpt = locate(c.base_name, c.allow_pickle, c.revision, c.cache_dir, token)  # cached: read once
    if not ckpt.why:
        return {}
    return {"prediction_type": c.prediction_type or ckpt.prediction_type, "base_why": ckpt.why,
            "zero_terminal_snr": c.zero_terminal_snr or ckpt.zero_terminal_snr}


def resolve_configs(ckpt: detect.Checkpoint, base_config: str | None, cache_dir=None, token=None) -> str:
    """The folder (or Hub id) holding the family's configs and tokenizers: --base_config, checked to be the file's
    family and size, or diffusers' own pick for the file when the Hub is reachable; offline without it, one line."""
    from .. import models

    if base_config is None:
        base_config = _default_configs(ckpt, cache_dir, token)
    configs = models.resolve_base(base_config, None, cache_dir, token, flag=FLAG)
    pipeline_class, unet, _ = models.base_configs(configs, cache_dir=cache_dir)
    if not unet:
        raise UserError(f"{FLAG} {base_config}: no unet/config.json; give a diffusers folder or Hub id of the "
                        f"checkpoint's family ({models.FAMILIES[ckpt.family]})")
    have = models.family_of(unet, pipeline_class)
    if have != ckpt.family:
        raise UserError(f"{FLAG} {base_config}: holds {models.FAMILIES[have]} configs, but {ckpt.path.name} is an "
                        f"{models.FAMILIES[ckpt.family]} checkpoint; give a {models.FAMILIES[ckpt.family]} folder")
    conv_in = ckpt.shapes.get(ldm.UNET + "input_blocks.0.0.weight")
    if conv_in and conv_in[0] != unet["block_out_channels"][0]:
        raise UserError(f"{FLAG} {base_config}: its UNet starts at {unet['block_out_channels'][0]} channels, the "
                        f"checkpoint's at {conv_in[0]}: they are different models; give configs of the same size")
    return configs


def _default_configs(ckpt: detect.Checkpoint, cache_dir, token) -> str:
    """The config repo diffusers picks for this checkpoint (from names and shapes: no weights read), its configs
    and tokenizers downloaded; one line offline."""
    import torch
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in ckpt.shapes.items()}
    repo = fetch_diffusers_config(state)["pretrained_model_name_or_path"]
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, allow_patterns=["*.json", "*.txt"], cache_dir=cache_dir, token=token)
    except Exception:
        raise UserError(f"{ckpt.path.name}: a single-file checkpoint needs its family's configs and tokenizers, and "
                        f"the Hub ({repo}) is unreachable; pass {FLAG} DIR_OR_ID, a diffusers "
                        f"{ckpt.family.upper()} folder (any model of that family: only its configs are read)") from None


def state(path: str | Path, part: str, dtype, allow_pickle: bool = False) -> dict:
    """One component's tensors from the file, floating-point ones cast to `dtype` one tensor at a time."""
    from .. import streamload

    path = Path(path)
    want = PREFIXES[part]
    if path.suffix.lower() in detect.PICKLE:
        if not allow_pickle:
            raise UserError(f"{path}: a pickle checkpoint, which can run code when loaded; pass --allow_pickle if you "
                            f"trust it")
        tensors = detect.pickle_state(path, "--pretrained_model_name_or_path")
        return {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in tensors.items() if k.startswith(want)}
    return dict(streamload.iter_cast(path, dtype, want=lambda k: k.startswith(want)))


def component(cls, path, part: str, configs: str, dtype, allow_pickle: bool = False, cache_dir=None):
    """The UNet, VAE or a text encoder of a single-file checkpoint, built from `configs`' config for it."""
    from ..logs import no_progress_bars, quiet

    tensors = state(path, part, dtype, allow_pickle)
    if not tensors:
        raise UserError(f"{path}: holds no {part} weights ({' / '.join(PREFIXES[part])}*); a checkpoint without "
                        f"them can't be a base here")
    with quiet(), no_progress_bars():
        try:
            if part.startswith("text_encoder"):
                from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

                return create_diffusers_clip_model_from_ldm(cls, tensors, subfolder=part, config=configs,
                                                            torch_dtype=dtype, local_files_only=Path(configs).is_dir())
            return cls.from_single_file(tensors, config=configs, subfolder=part, torch_dtype=dtype,
                                        cache_dir=cache_dir, local_files_only=Path(configs).is_dir()).eval()
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"{path}: could not load its {part} with {FLAG} {configs} ({why})") from None


def part(name: str, base, base_config=None, subfolder=None, **kw):
    """A base's UNet, VAE or text encoder (`name`: "unet", "vae", "text_encoder"): `models.load_*` for a folder or
    Hub id (and a separate --pretrained_vae_model_name_or_path), `component` for a single-file checkpoint."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .. import models

    name = subfolder or name
    if not base_config or kw.get("vae"):
        if name == "unet":
            return models.load_unet(base, **kw)
        if name == "vae":
            return models.load_vae(base, **kw)
        return models.load_text_encoder(base, **kw, subfolder=name)
    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}.get(name) or \
        getattr(transformers, models.TEXT_CLASSES[name])
    return component(cls, base, name, base_config, kw.get("dtype") or torch.float32, kw.get("allow_pickle", False),
                     kw.get("cache_dir"))


def for_pipeline(base, base_config=None, allow_pickle=False, revision=None, cache_dir=None) -> tuple | None:
    """(local file, configs folder or id, family) when `base` is a single-file checkpoint, else None (and
    base_config with a folder base is one line)."""
    if not detect.is_single_file(str(base)):
        if base_config:
            raise UserError(f"base_config is for single-file checkpoints; {base} holds its own configs")
        return None
    ckpt = locate(str(base), allow_pickle, revision, cache_dir, flag="base model")
    return str(ckpt.path), resolve_configs(ckpt, base_config, cache_dir), ckpt.family


def pipeline(path: str, configs: str, family: str, dtype=None, allow_pickle: bool = False, **kw):
    """The family's unmodified diffusers pipeline over a single file's components (each loaded by `component`),
    its tokenizers and scheduler from `configs`. `kw` goes to `from_pretrained` (e.g. safety_checker=None)."""
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .. import models
    from ..logs import quiet

    dtype = dtype or torch.float32
    parts = {"unet": component(UNet2DConditionModel, path, "unet", configs, dtype, allow_pickle),
             "vae": component(AutoencoderKL, path, "vae", configs, dtype, allow_pickle)}
    names = models.TEXT_ENCODERS if family == "sdxl" else models.TEXT_ENCODERS[:1]
    for n in names:
        parts[n] = component(getattr(transformers, models.TEXT_CLASSES[n]), path, n, configs, dtype, allow_pickle)
    if family == "sdxl":
        cls = diffusers.StableDiffusionXLPipeline
    else:
        cls = diffusers.StableDiffusionPipeline
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with quiet():
        try:
            pipe = cls.from_pretrained(configs, **{**parts, **kw}, local_files_only=Path(configs).is_dir())
        except (OSError, ValueError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"{FLAG} {configs}: could not read its tokenizers and scheduler ({why})") from None
    pipe.register_to_config(_name_or_path=path)
    return pipe
