"""A base model folder checked file by file before any weights load, so each fault is one line naming the file.

Cheap: the JSON files, each safetensors file's header (never its tensors), and each model built on the meta device
from its config to count the weights the config asks for. What loading would hit later as a traceback (a tokenizer
without its length, a config with negative or absurd sizes, a truncated weights file, a UNet that does not fit its
VAE or text encoder) is reported here instead. Hub ids are not checked (loading reports their faults); folders are.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import models, sd3base
from .errors import UserError

# The pipeline classes whose components sdlora loads (model_index.json's _class_name); the img2img ones have the
# same components as their text-to-image pipeline.
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline",
             "StableDiffusionXLImg2ImgPipeline", sd3base.PIPELINE)
# SDXL's added-time conditioning: original size, crop corner, target size (conditioning.py) as its 6 time ids.
SDXL_TIME_IDS = 6
MAX_SIDE = 16384  # a default image side (sample_size x VAE factor) past this is a damaged config, not a model
# Sizes a config holds as positive whole numbers (or lists of them), where it has them (None: not used).
SIZES = {
    "unet": ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
             "cross_attention_dim", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
             "norm_num_groups", "addition_time_embed_dim", "projection_class_embeddings_input_dim"),
    "vae": ("sample_size", "in_channels", "out_channels", "latent_channels", "block_out_channels",
            "layers_per_block", "norm_num_groups"),
    "text_encoder": ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                     "max_position_embeddings", "projection_dim"),
    "transformer": ("sample_size", "patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                    "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                    "pos_embed_max_size"),
    "t5": ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"),
}
_FIX = "re-download the model or fix the file"


def check(base: str, vae: str | None = None, variant: str | None = None, t5: bool = True) -> None:
    """Raise a one-line UserError naming the first bad file of a local base folder (a Hub id passes unchecked).
    `vae`: a separate VAE folder used instead of the base's (its config.json and weights at its top). `t5`: an SD3
    base's T5 encoder is used (False: --drop_t5; its files are then not needed)."""
    root = Path(base)
    if not root.is_dir():
        return
    index = _index(root)
    vae_dir = Path(vae) if vae else root / "vae"
    if sd3base.is_sd3(index.get("_class_name")):
        return _check_sd3(root, index, vae, vae_dir, variant, t5)
    unet = _config(root / "unet" / "config.json", "unet")
    vae_config = _vae_config(vae, vae_dir)
    xl = models.family_of(unet, index.get("_class_name")) == "sdxl"
    encoders = models.TEXT_ENCODERS if xl else models.TEXT_ENCODERS[:1]
    texts = {n: _config(root / n / "config.json", "text_encoder") for n in encoders}
    for n, te in texts.items():
        _tokenizer(root / n.replace("text_encoder", "tokenizer"), root / n / "config.json", te)
    _config(root / "scheduler" / "scheduler_config.json", None)
    _fits(root, unet, vae_config, texts, xl)
    _all_weights_fit(root, {"unet": unet, **texts}, vae, vae_config, vae_dir, variant)


def _check_sd3(root: Path, index: dict, vae: str | None, vae_dir: Path, variant: str | None, t5: bool) -> None:
    """`check` for an SD3 / 3.5 folder: the transformer, VAE, both CLIPs and (unless dropped, or absent from
    model_index.json) T5, each config, tokenizer and weights file, and that they fit one another."""
    tr = _config(root / "transformer" / "config.json", "transformer")
    vae_config = _vae_config(vae, vae_dir)
    clips = {n: _config(root / n / "config.json", "text_encoder") for n in sd3base.TRAINABLE_TEXT}
    for n, te in clips.items():
        _tokenizer(root / n.replace("text_encoder", "tokenizer"), root / n / "config.json", te)
    t5_config = None
    if t5 and (index.get("text_encoder_3") or [None])[0] is not None:
        t5_config = _config(root / "text_encoder_3" / "config.json", "t5")
        _tokenizer_files(root / "tokenizer_3")
    _config(root / "scheduler" / "scheduler_config.json", None)
    where = root / "transformer" / "config.json"
    for key in ("in_channels", "out_channels") if vae_config else ():
        if tr[key] != vae_config["latent_channels"]:
            raise UserError(f"{where}: {key} is {tr[key]}, but the VAE's latents have {vae_config['latent_channels']} "
                            f"channels (latent_channels); the transformer and VAE come from different models")
    pooled, width = (sum(te[k] for te in clips.values()) for k in ("projection_dim", "hidden_size"))
    if tr["pooled_projection_dim"] != pooled:
        raise UserError(f"{where}: pooled_projection_dim is {tr['pooled_projection_dim']}, but the two CLIPs' pooled "
                        f"projections give {pooled} (projection_dim); the transformer and text encoders come from "
                        f"different models")
    joint = tr["joint_attention_dim"]
    if width > joint or (t5_config and t5_config["d_model"] != joint):
        what = f"T5 gives {t5_config['d_model']} (d_model)" if width <= joint else \
            f"the two CLIPs' hidden states side by side are {width} wide"
        raise UserError(f"{where}: joint_attention_dim is {joint}, but {what}; the transformer and text encoders come "
                        f"from different models")
    t5_part = {"text_encoder_3": t5_config} if t5_config is not None else {}
    _all_weights_fit(root, {"transformer": tr, **clips, **t5_part}, vae, vae_config, vae_dir, variant)


def _vae_config(vae: str | None, vae_dir: Path) -> dict | None:
    """The VAE's config, checked; None for a separate VAE given as a Hub id (loading checks it)."""
    return None if vae and not vae_dir.is_dir() else _config(vae_dir / "config.json", "vae")


def _all_weights_fit(root: Path, configs: dict, vae: str | None, vae_config: dict | None, vae_dir: Path,
                     variant: str | None) -> None:
    """`_weights_fit` for each component folder of `root` ({name: config}) in the base's variant, then the VAE's
    (a separate VAE, `vae`, loads without the base's variant)."""
    for name, config in configs.items():
        _weights_fit(name, config, root / name, variant)
    if vae_config is not None:
        _weights_fit("vae", vae_config, vae_dir, None if vae else variant)


def _index(root: Path) -> dict:
    """model_index.json, which names the pipeline (absent: a bare component layout, loading decides)."""
    path = root / "model_index.json"
    if not path.exists():
        return {}
    index = _json(path)
    cls = index.get("_class_name")
    if cls not in PIPELINES:
        raise UserError(f"{path}: names {'pipeline ' + repr(cls) if cls else 'no pipeline (_class_name)'}, which "
                        f"sdlora does not train or sample; it takes Stable Diffusion 1.x/2.x, SDXL and SD3 bases "
                        f"(StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline)")
    return index


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {_FIX.replace('fix the file', 'copy the whole folder')}") from None
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else "not valid JSON"
        raise UserError(f"{path}: {why}; {_FIX}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object; {_FIX}")
    return data


def _config(path: Path, kind: str | None) -> dict:
    """A component's config as its model is built from it (the class's defaults for what the file leaves out), its
    sizes positive whole numbers; `kind` (a key of SIZES) says which model."""
    if not path.parent.is_dir():
        raise UserError(f"{path.parent}: missing, and the base needs its {path.parent.name}; re-download the model "
                        f"or copy the whole folder")
    config = _json(path)
    if kind in ("text_encoder", "t5"):
        from transformers import CLIPTextConfig, T5Config

        config = {**(CLIPTextConfig if kind == "text_encoder" else T5Config)().to_dict(), **config}
    elif kind:
        from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

        cls = {"unet": UNet2DConditionModel, "transformer": SD3Transformer2DModel}.get(kind, AutoencoderKL)
        config = models.with_defaults(cls, config)
    for key in SIZES.get(kind, ()):
        value = config.get(key)
        flat = list(_flatten(value))
        if value is not None and not (flat and all(type(v) is int and v > 0 for v in flat)):
            raise UserError(f"{path}: {key} is {json.dumps(value)[:60]}, not a positive whole number; {_FIX}")
    return config


def _flatten(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    else:
        yield value


def _tokenizer(folder: Path, te_path: Path, te: dict) -> None:
    """Its files parse, and its length fits the text encoder's position embeddings (the token length the base
    was trained with: a tokenizer without one pads to 10^30 tokens)."""
    config = _tokenizer_files(folder, ("vocab.json", "merges.txt"))
    length, positions = config.get("model_max_length"), te["max_position_embeddings"]
    if type(length) is not int or not 0 < length <= positions:
        raise UserError(f"{folder / 'tokenizer_config.json'}: model_max_length is {json.dumps(length)}, but the text "
                        f"encoder takes up to {positions} tokens ({te_path} max_position_embeddings); set it to "
                        f"{positions}")


def _tokenizer_files(folder: Path, slow: tuple = ("spiece.model",)) -> dict:
    """A tokenizer folder's files are there and parse (tokenizer.json, or the `slow` tokenizer's files); returns its
    tokenizer_config.json."""
    if not folder.is_dir():
        raise UserError(f"{folder}: missing, and the base needs its tokenizer; re-download the model or copy the "
                        f"whole folder")
    if not (folder / "tokenizer.json").exists() and not all((folder / f).exists() for f in slow):
        raise UserError(f"{folder}: no tokenizer.json (or {' and '.join(slow)}); re-download the model")
    for name in ("tokenizer.json", "vocab.json", "special_tokens_map.json"):
        if (folder / name).exists():
            _json(folder / name)
    return _json(folder / "tokenizer_config.json")


def _fits(root: Path, unet: dict, vae: dict | None, texts: dict, xl: bool) -> None:
    """The UNet takes what the VAE (None: not known here) and the text encoders give it."""
    where = root / "unet" / "config.json"
    for key in ("in_channels", "out_channels") if vae else ():
        if unet[key] != vae["latent_channels"]:
            raise UserError(f"{where}: {key} is {unet[key]}, but the VAE's latents have {vae['latent_channels']} "
                            f"channels (latent_channels); sdlora trains text-to-image UNets on the VAE's latents (an "
                            f"inpainting base is not one)")
    width = sum(te["hidden_size"] for te in texts.values())
    # (a UNet that projects the text first, encoder_hid_dim, takes other widths)
    if isinstance(unet["cross_attention_dim"], int) and unet["encoder_hid_dim"] is None \
            and unet["cross_attention_dim"] != width:
        raise UserError(f"{where}: cross_attention_dim is {unet['cross_attention_dim']}, but the text encoder"
                        f"{'s give' if xl else ' gives'} {width} (hidden_size); the UNet and text encoders come "
                        f"from different models")
    side = max(_flatten(unet["sample_size"])) * models.vae_factor(vae) if vae and unet["sample_size"] else 0
    if side > MAX_SIDE:
        raise UserError(f"{where}: sample_size {unet['sample_size']} makes {side} px images, more than {MAX_SIDE}; "
                        f"{_FIX}")
    if xl:
        pooled = texts["text_encoder_2"]["projection_dim"]
        want = SDXL_TIME_IDS * (unet["addition_time_embed_dim"] or 0) + pooled
        if unet["projection_class_embeddings_input_dim"] != want:
            raise UserError(f"{where}: projection_class_embeddings_input_dim is "
                            f"{unet['projection_class_embeddings_input_dim']}, but SDXL's {SDXL_TIME_IDS} time ids "
                            f"x addition_time_embed_dim {unet['addition_time_embed_dim']} + the pooled text "
                            f"({pooled}) make {want}; the UNet is not an SDXL base UNet this pipeline can condition")


def _weights_fit(name: str, config: dict, folder: Path, variant: str | None) -> None:
    """Each safetensors file the component loads opens, and holds at least the weights its config asks for."""
    files = _weights_files(folder, variant)
    if not files:  # pickle weights or none: the loader says which, and when --allow_pickle is needed
        return
    held = sum(_elements(f) for f in files)
    wanted = _parameters(name, config, folder)
    if held < wanted:
        raise UserError(f"{files[0] if len(files) == 1 else folder}: holds {held:,} weights, but "
                        f"{folder / 'config.json'} describes a {name} of {wanted:,}: they are not one model; {_FIX}")


def _weights_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors file (or shards) diffusers/transformers would read, as they name them."""
    for stem in ("diffusion_pytorch_model", "model"):
        single = folder / (f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors")
        if single.exists():
            return [single]
        names = [f"{stem}.safetensors.index.{variant}.json", f"{stem}.{variant}.safetensors.index.json"] \
            if variant else [f"{stem}.safetensors.index.json"]
        for index in (folder / n for n in names):
            if index.exists():
                shards = _json(index).get("weight_map")
                if not isinstance(shards, dict) or not shards:
                    raise UserError(f"{index}: no weight_map of shards; {_FIX}")
                return [folder / s for s in dict.fromkeys(map(str, shards.values()))]
    return []


def _elements(path: Path) -> int:
    """How many weights a safetensors file holds, from its header; a damaged file is one line naming it."""
    def damaged(why):
        return UserError(f"{path}: a damaged safetensors file ({why}); re-download it (a partial or interrupted "
                         f"download leaves such a file)")
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            head = f.read(8)
            if len(head) < 8:
                raise damaged(f"{size} bytes, shorter than its header")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 << 20):  # safetensors caps the header at 100 MB
                raise damaged("its header length is garbage")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise UserError(f"{path}: missing, though its index names it; re-download the model") from None
    except OSError as e:
        raise UserError(f"{path}: can't read it ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError):
        raise damaged("its header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    total, end = 0, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, (_, stop) = [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise damaged(f"tensor {name!r} has no shape or offsets") from None
        total, end = total + math.prod(shape), max(end, stop)
    if 8 + n + end > size:
        raise damaged(f"truncated: {size:,} bytes, its header describes {8 + n + end:,}")
    return total


def _parameters(name: str, config: dict, folder: Path) -> int:
    """How many weights the model `config` describes, counted on a model built on the meta device (no memory)."""
    import torch

    try:
        with torch.device("meta"):
            own = {k: v for k, v in config.items() if not k.startswith("_")}
            if name == "unet":
                model = models.meta_unet(config)
            elif name in ("vae", "transformer"):
                from diffusers import AutoencoderKL, SD3Transformer2DModel

                model = (AutoencoderKL if name == "vae" else SD3Transformer2DModel).from_config(config)
            elif name == "text_encoder_3":
                import transformers

                model = transformers.T5EncoderModel(transformers.T5Config(**own))
            else:
                import transformers

                # SD3's first CLIP has a projection, SD 1.x/XL's not (the folder's config names the class)
                arch = (config.get("architectures") or [models.TEXT_CLASSES[name]])[0]
                cls = getattr(transformers, arch if arch.startswith("CLIPTextModel") else models.TEXT_CLASSES[name])
                model = cls(transformers.CLIPTextConfig(**own))
    except Exception as e:  # what the loader would raise, as a traceback, after the other models loaded
        why = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{folder / 'config.json'}: no {name} can be built from it ({why}); {_FIX}") from None
    return sum(p.numel() for p in model.parameters())
