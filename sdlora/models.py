"""The base Stable Diffusion model: find it, check it, load its components, encode prompts.

`resolve_base` and `check_targets` run before anything heavy: a wrong path, Hub id or layer name is
a one-line error, not a traceback after minutes of loading. torch is imported lazily so the
`sdlora` command starts fast.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from . import sd3base
from .errors import UserError
from .hub import HUB_ID, hub_file

# Precision names as the flags spell them -> torch dtypes: one table for training, saving, class
# images and inference.
PRECISIONS = {"no": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str):
    import torch

    if name not in PRECISIONS:
        raise UserError(f"unknown precision '{name}'; expected one of {', '.join(PRECISIONS)}")
    return getattr(torch, PRECISIONS[name])


def precision_name(dtype) -> str:
    """A torch dtype as the flags spell it: torch.bfloat16 -> "bf16" (the inverse of `torch_dtype`)."""
    return {v: k for k, v in PRECISIONS.items() if k != "no"}[str(dtype).removeprefix("torch.")]


def native_bf16() -> str | None:
    """The CPU feature that computes bf16 natively ("AMX-BF16", "AVX512-BF16", Arm's "BF16"), or None: without one,
    bf16 on CPU is emulated and slower than fp32."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for name, probe in (("AMX-BF16", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        try:
            if getattr(cpu, probe)():
                return name
        except Exception:  # an older torch without the probe: read the kernel's flags below
            pass
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return next((n for f, n in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("bf16", "BF16"))
                 if f in flags), None)


def fast_precision(device) -> str:
    """The precision to sample in when the user names none: fp16 on a GPU, bf16 on a CPU that computes it natively
    (same prompt following on the bundled model, faster), fp32 otherwise."""
    import torch

    if torch.device(device).type == "cuda":
        return "fp16"
    return "bf16" if torch.device(device).type == "cpu" and native_bf16() else "fp32"


def precision_note(mixed_precision: str | None, device, chosen: bool = False) -> str:
    """Which precision a run computes in and why, for the log: the CPU's bf16 support decides what to advise.
    fp32 `chosen` with --mixed_precision no gets no advice to change it (it was a choice, not a default)."""
    import torch

    mp = mixed_precision if mixed_precision in ("fp16", "bf16") else "no"
    advise = mp == "no" and not chosen
    if torch.device(device).type == "cuda":
        return f"{'fp32' if mp == 'no' else mp} on the GPU" + ("; --mixed_precision fp16 or bf16 is faster and "
                                                               "halves the frozen weights' memory" if advise else "")
    native = native_bf16()
    if mp == "bf16":
        return f"bf16 on the CPU ({native} computes it natively)" if native else \
            "bf16 on the CPU, emulated (no native bf16 on this CPU: --mixed_precision no is likely faster)"
    return "fp32 on the CPU" + (f"; this CPU has {native}: --mixed_precision bf16 trains about 2x faster in 60% of "
                                "the memory (SD-sized models)" if native and advise else "")


ASSETS = Path(__file__).parent / "assets"
# Short names for models shipped inside the package.
BUNDLED = {"sdlora-tiny": ASSETS / "tiny-sd", "sdlora-tiny-xl": ASSETS / "tiny-sdxl",
           "sdlora-tiny-sd3": ASSETS / "tiny-sd3"}
# The guidance each bundled model was measured at (it follows held-out prompts best there, and a style LoRA shows;
# docs/tiny-model.md), and the usual default for real bases (diffusers' own).
BUNDLED_GUIDANCE = {"sdlora-tiny": 3.0, "sdlora-tiny-xl": 3.0, "sdlora-tiny-sd3": 3.0}
GUIDANCE = 7.5


def resolve_base(name: str, revision: str | None = None, cache_dir: str | None = None,
                 token: str | None = None, flag: str = "--pretrained_model_name_or_path", vae: bool = False) -> str:
    """Return a loadable path or Hub id, or raise UserError saying what is wrong. `vae`: a VAE alone (its
    config.json at the top, as SDXL's fp16-fix VAE), not a pipeline folder."""
    kind, marker = ("VAE", "config.json") if vae else ("diffusers pipeline", "model_index.json")
    if name in BUNDLED:
        path = BUNDLED[name]
        if not (path / "model_index.json").exists():
            raise UserError(f"{flag} {name}: the bundled model is missing from {path}; reinstall sdlora")
        return str(path)
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not ((p / marker).exists() or (not vae and (p / "unet" / "config.json").exists())):
            found = marker if vae else "model_index.json or unet/config.json"
            raise UserError(f"{flag} {name}: not a {kind} folder (no {found})")
        return str(p)
    if name.startswith((".", "/", "~")) or not HUB_ID.match(name):
        raise UserError(f"{flag} {name}: no such folder, and not a valid Hub model id")
    # A Hub id: fetch its tiny model_index.json (config.json) now so an unknown id or no network fails fast.
    hub_file(name, marker, flag, kind, revision=None if vae else revision, cache_dir=cache_dir, token=token)
    return name


def default_guidance(base: str, own: float | None = None) -> float:
    """The guidance to sample `base` at when none is given: a bundled model's measured one (by its short name or
    its folder), else `own` (the base pipeline's own default where sdlora keeps it: SD3, `sd3base.own_guidance`),
    else GUIDANCE."""
    for name, path in BUNDLED.items():
        if str(base) == name or Path(base).expanduser().resolve() == path.resolve():
            return BUNDLED_GUIDANCE[name]
    return GUIDANCE if own is None else own


# The base model families sdlora knows, as `family` names them, and how the log and model card say them.
FAMILIES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD3"}


def denoiser(family_: str) -> str:
    """The pipeline component LoRA's denoiser is, as a folder and as diffusers' LoRA files prefix it: SD3's MMDiT is
    the "transformer", every other family's the "unet"."""
    return "transformer" if family_ == "sd3" else "unet"
# Each family's cross-attention width: its text encoder's hidden size (CLIP ViT-L, OpenCLIP ViT-H, both of SDXL's).
WIDTHS = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
# SD 1.x/2.x by that width (SDXL is told by its text_time conditioning instead).
FAMILY_BY_WIDTH = {WIDTHS["sd1"]: "sd1", WIDTHS["sd2"]: "sd2"}
# The base's text encoders as its subfolders (and a LoRA's component prefixes) name them, with their transformers
# class: SD 1.x/2.x have the first; SDXL both, the second projecting its pooled output.
TEXT_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
TEXT_ENCODERS = tuple(TEXT_CLASSES)


def family_of(unet_config, pipeline_class: str | None = None) -> str:
    """"sd1", "sd2" or "sdxl" from a UNet config (and the pipeline class in model_index.json, if known).

    SDXL: an XL pipeline class or a UNet conditioned on text_time (pooled text + size/crop ids).
    Otherwise the cross-attention width names the family (768: SD 1.x's CLIP ViT-L, 1024: SD 2.x's
    OpenCLIP ViT-H); other widths (tiny test models, odd finetunes) go by the UNet layout, SD 2.x's
    linear proj_in/proj_out meaning sd2, and SD 1.x's layout (the most common) otherwise."""
    if sd3base.is_sd3(pipeline_class, unet_config):  # an MMDiT (its transformer config stands for the UNet's)
        return "sd3"
    if (pipeline_class or "").startswith("StableDiffusionXL") or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    dim = unet_config.get("cross_attention_dim")
    if dim in FAMILY_BY_WIDTH:
        return FAMILY_BY_WIDTH[dim]
    return "sd2" if unet_config.get("use_linear_projection") else "sd1"


def base_configs(base: str, revision=None, cache_dir=None, vae: str | None = None) -> tuple[str | None, dict, dict]:
    """(pipeline class from model_index.json, UNet config, VAE config) of a base, each read once for every
    check before loading: config files only, with the model classes' defaults filled in. `vae`: a separate VAE
    (--pretrained_vae_model_name_or_path) whose config replaces the base's. Missing pieces are None / {} (an
    unusual layout: loading reports it)."""
    from diffusers import AutoencoderKL, DiffusionPipeline, SD3Transformer2DModel, UNet2DConditionModel

    def read(load, where=base, **kw):
        try:
            return load(where, cache_dir=cache_dir, **kw)
        except Exception:
            return {}

    index = read(DiffusionPipeline.load_config, revision=revision)
    denoiser, where = (SD3Transformer2DModel, "transformer") if sd3base.is_sd3(index.get("_class_name")) else \
        (UNet2DConditionModel, "unet")
    unet = read(denoiser.load_config, subfolder=where, revision=revision)
    vae = read(AutoencoderKL.load_config, vae) if vae else \
        read(AutoencoderKL.load_config, subfolder="vae", revision=revision)
    return index.get("_class_name"), with_defaults(denoiser, unet), with_defaults(AutoencoderKL, vae)


def with_defaults(cls, config) -> dict:
    """A diffusers model's config as the model is built from it: the class's defaults where the file says nothing
    (a VAE config without block_out_channels is one block, factor 1, not SD's 8). {} stays {} (unreadable)."""
    import inspect

    if not config:
        return {}
    init = inspect.signature(cls.__init__).parameters.items()
    return {**{k: p.default for k, p in init if p.default is not p.empty}, **config}


def meta_unet(unet_config: dict):
    """An empty UNet built on the meta device from its config (no memory), shared by the checks that read its
    layers: building an SD-sized one takes about a second."""
    return _meta_unet(json.dumps(unet_config, sort_keys=True, default=list))


@functools.lru_cache(maxsize=2)
def _meta_unet(config_json: str):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(json.loads(config_json))


def family(base: str, revision=None, cache_dir=None) -> str:
    """"sd1", "sd2" or "sdxl" for a base model folder or Hub id, from its config files (see `family_of`)."""
    pipeline_class, unet, _ = base_configs(base, revision, cache_dir)
    return family_of(unet, pipeline_class)


def describe(family_: str, prediction_type: str | None = None) -> str:
    """How the log and model card name a base: "SD 2.x (v-prediction)", "SD 1.x", "SDXL"."""
    name = FAMILIES.get(family_, family_)
    return f"{name} (v-prediction)" if prediction_type == "v_prediction" else name


def architecture(unet_config, prediction_type: str = "epsilon", family_: str | None = None) -> str:
    """The model spec's architecture id for a base (`modelspec.architecture` without the `/lora` suffix),
    as kohya's sd-scripts name them: SD 2.x is 768-v with v-prediction, 512 otherwise; SD 1.x (and the
    tiny stand-ins with its layout) is stable-diffusion-v1 whatever the prediction type."""
    family_ = family_ or family_of(unet_config)
    if family_ == "sd3":
        return sd3base.architecture(unet_config)
    if family_ == "sdxl":
        return "stable-diffusion-xl-v1-base"
    if family_ == "sd2":
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


# Layer names users target, to suggest when a --target_modules entry matches nothing.
COMMON_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                  "conv1", "conv2", "conv_shortcut", "time_emb_proj"]


def check_targets(base: str, unet_config: dict, targets: list[str], linear_only: str | None = None):
    """Each --target_modules entry must name Linear/Conv2d layers of the base UNet, as peft matches them
    (the module name, or a dotted suffix of it); only Linear ones when `linear_only` names the flag that needs
    that. Checked on an empty meta-device UNet built from the config (`base_configs`), so a typo costs
    milliseconds instead of a traceback after the models load."""
    import torch

    if not unet_config:  # an unusual layout: loading it reports the real problem
        return
    try:
        unet = meta_unet(unet_config)
    except Exception:  # an unusual UNet: loading it reports the real problem
        return
    layers = dict(unet.named_modules())
    for t in targets:
        hits = [m for n, m in layers.items() if n == t or n.endswith("." + t)]
        bad = {type(m).__name__ for m in hits if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        if not hits or bad:
            known = [c for c in COMMON_TARGETS if any(n.endswith("." + c) for n in layers)]
            what = f"names {', '.join(sorted(bad))} layers, not Linear/Conv2d" if bad else "matches no layer"
            raise UserError(f"--target_modules {t}: {what} of the UNet in {base}; use layer names such as "
                            f"{', '.join(known)}")
        if linear_only and any(isinstance(m, torch.nn.Conv2d) for m in hits):
            raise UserError(f"--target_modules {t}: names Conv2d layers, which peft initialises with {linear_only} "
                            f"only for Linear layers; drop it from --target_modules or use --init_lora_weights gaussian")


def vae_factor(vae_config: dict) -> int:
    """How many pixels one latent pixel covers along a side (2 per down block after the first: 8 for every real
    SD VAE, 4 for the bundled tiny ones), as diffusers' pipelines compute it. KeyError on an empty config."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def size_multiple(unet_config: dict, vae_config: dict) -> int:
    """The pixel multiple an image side should be for a base (its `base_configs`): the VAE's downsampling times
    the UNet's (8 x 8 = 64 for SD 1.x/2.x, 8 x 4 = 32 for SDXL; 16 for sdlora-tiny)."""
    if "patch_size" in unet_config:  # an MMDiT: the latent is cut into patch_size x patch_size tokens
        return vae_factor(vae_config) * unet_config["patch_size"]
    return vae_factor(vae_config) * 2 ** (len(unet_config["down_block_types"]) - 1)


def sample_multiple(vae_config: dict) -> int:
    """The multiple an image drawn through diffusers' SD pipelines must have per side: the VAE's downsampling,
    and 8, which those pipelines require whatever the VAE (their check_inputs)."""
    return math.lcm(vae_factor(vae_config), 8)


def multiples_near(value: int, multiple: int) -> str:
    """The multiples of `multiple` either side of `value`, for an error's advice: "32 or 40"."""
    below = value // multiple * multiple
    return f"{below} or {below + multiple}" if below > 0 else str(multiple)


def no_safetensors(reason: str) -> bool:
    """Whether a load error says the component has no safetensors file (so pickle weights are all there is and
    --allow_pickle is the advice), not that its safetensors file is damaged."""
    return "no file named" in reason and ".safetensors" in reason


def load_model(cls, base, subfolder, allow_pickle, **kw):
    import torch

    from .logs import no_progress_bars

    kw = {k: (torch.float32 if v is None and k in ("dtype", "torch_dtype") else v) for k, v in kw.items()}
    try:
        if kw.get("torch_dtype") in (torch.float16, torch.bfloat16):  # diffusers models: no fp32 copy on the way
            from . import streamload

            model = streamload.load(cls, base, subfolder or "", kw["torch_dtype"], kw.get("variant"),
                                    kw.get("revision"), kw.get("cache_dir"))
            if model is not None:
                return model
        with no_progress_bars():
            return cls.from_pretrained(base, subfolder=subfolder, use_safetensors=None if allow_pickle else True, **kw)
    except (OSError, EnvironmentError, ValueError) as e:
        msg = str(e).splitlines()[0][:300]
        hint = "; pass --allow_pickle to load .bin weights you trust" if no_safetensors(msg) else \
            "; if a weights file is damaged (a partial download), re-download it" if "safetensors" in msg else ""
        raise UserError(f"{base}{'/' + subfolder if subfolder else ''}: could not load ({msg}){hint}") from None


def load_tokenizer(base, revision=None, cache_dir=None, subfolder: str = "tokenizer"):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(base, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    except OSError as e:
        raise UserError(f"{base}/{subfolder}: could not load ({str(e).splitlines()[0][:200]})") from None


def load_text_encoder(base, revision=None, variant=None, cache_dir=None, dtype=None, allow_pickle=False,
                      subfolder: str = "text_encoder"):
    """A CLIP text encoder; SDXL's second one (`text_encoder_2`) with its projection, whose pooled output
    conditions the UNet."""
    import transformers

    return load_model(getattr(transformers, TEXT_CLASSES[subfolder]), base, subfolder, allow_pickle, revision=revision,
                      variant=variant, cache_dir=cache_dir, dtype=dtype)


def load_vae(base, revision=None, variant=None, cache_dir=None, dtype=None, allow_pickle=False, vae=None):
    """The base's VAE, or `vae` (a folder or Hub id holding only a VAE, e.g. SDXL's fp16-fix VAE)."""
    from diffusers import AutoencoderKL

    if vae:
        return load_model(AutoencoderKL, vae, None, allow_pickle, cache_dir=cache_dir, torch_dtype=dtype)
    return load_model(AutoencoderKL, base, "vae", allow_pickle, revision=revision, variant=variant,
                 cache_dir=cache_dir, torch_dtype=dtype)


def load_unet(base, revision=None, variant=None, cache_dir=None, dtype=None, allow_pickle=False):
    from diffusers import UNet2DConditionModel

    return load_model(UNet2DConditionModel, base, "unet", allow_pickle, revision=revision, variant=variant,
                 cache_dir=cache_dir, torch_dtype=dtype)


def load_noise_scheduler(base, revision=None, cache_dir=None):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(base, subfolder="scheduler", revision=revision, cache_dir=cache_dir)


def tokenize(tokenizer, captions: list[str], max_length: int | None = None):
    return tokenizer(captions, padding="max_length", truncation=True,
                     max_length=max_length or tokenizer.model_max_length, return_tensors="pt")


def encode_prompts(text_encoder, tokenizer, captions: list[str], max_length: int | None = None,
                   use_attention_mask: bool = False, clip_skip: int | None = None):
    """CLIP last hidden states for `captions`, as SD1.x conditions its UNet; with `clip_skip` N > 1 the N-th last
    layer's, through the final layer norm (kohya/A1111; diffusers' pipelines call it clip_skip N - 1)."""
    tok = tokenize(tokenizer, captions, max_length)
    device = next(text_encoder.parameters()).device
    mask = tok.attention_mask.to(device) if use_attention_mask else None
    if clip_skip and clip_skip > 1:
        hidden = text_encoder(tok.input_ids.to(device), attention_mask=mask, output_hidden_states=True).hidden_states
        return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden[-clip_skip])
    return text_encoder(tok.input_ids.to(device), attention_mask=mask, return_dict=False)[0]


def release(module, device):
    """Free a frozen module's memory on the training device once its outputs are cached.

    On GPU it moves to CPU RAM (cheap to bring back for validation); on CPU the training
    device *is* RAM, so it is dropped (None) and reloaded from disk if validation needs it.
    """
    import torch

    if torch.device(device).type == "cpu":
        return None
    return module.to("cpu")
