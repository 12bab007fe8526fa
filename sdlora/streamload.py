"""Load a diffusers model's safetensors weights straight into a half-precision dtype, one tensor at a time.

diffusers' `from_pretrained(torch_dtype=bf16)` reads the whole fp32 state dict and casts afterwards, so a
bf16/fp16 run peaks at the fp32 size on top of the cast model (SD1.5's UNet: 3.4 GB + 1.7 GB). Here the file
is read with plain reads — not mmap, whose touched pages count as resident memory — one tensor at a time,
cast, and assigned into a model built on the meta device: the peak is the cast model plus one tensor.
Anything unusual (pickle weights, renamed keys, modules kept in fp32) returns None and the caller
takes diffusers' own path.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_cast(path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, floating-point ones cast to `dtype` as each is read."""
    return dict(iter_cast(path, dtype))


def iter_cast(path, dtype: torch.dtype, want=None):
    """(name, tensor) for each of a safetensors file's tensors in file order, floating-point ones cast to `dtype`:
    only the tensor being handed out is in memory (quantize.load_unet quantizes each as it comes). `want(name)`:
    which tensors to read (default all); the others are skipped unread."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise OSError(f"{path}: not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):  # one forward pass
            if want is not None and not want(name):
                continue
            begin, end = info["data_offsets"]
            buf = bytearray(end - begin)
            f.seek(8 + n + begin)
            if f.readinto(buf) != len(buf):
                raise OSError(f"{path}: truncated at tensor {name}")
            t = torch.frombuffer(buf, dtype=_DTYPES[info["dtype"]]) if buf else torch.empty(0, dtype=_DTYPES[info["dtype"]])
            t = t.reshape(info["shape"])
            yield name, (t.to(dtype) if t.is_floating_point() else t)


def weights_files(base: str, subfolder: str, variant=None, revision=None, cache_dir=None) -> list[Path] | None:
    """The component's safetensors file, or its shards in index order (downloaded into the Hub cache for a Hub
    id), or None."""
    name = f"diffusion_pytorch_model{'.' + variant if variant else ''}.safetensors"

    def fetch(file: str) -> Path | None:
        if Path(base).is_dir():
            p = Path(base) / subfolder / file
            return p if p.is_file() else None
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(base, f"{subfolder}/{file}".lstrip("/"), revision=revision,
                                        cache_dir=cache_dir))
        except Exception:  # missing or offline: diffusers' own loader reports or handles it
            return None

    single = fetch(name)
    if single is not None:
        return [single]
    index = fetch(f"diffusion_pytorch_model.safetensors.index{'.' + variant if variant else ''}.json")  # diffusers' name
    if index is None:
        return None
    shards = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
    files = [fetch(s) for s in shards]
    return None if None in files else files


def load(cls, base: str, subfolder: str, dtype: torch.dtype, variant=None, revision=None, cache_dir=None):
    """A diffusers model (UNet, VAE) in `dtype` without an fp32 copy in memory, or None to use from_pretrained."""
    if getattr(cls, "_keep_in_fp32_modules", None):
        return None
    files = weights_files(base, subfolder, variant, revision, cache_dir)
    if files is None:
        return None
    config = cls.load_config(base, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    with torch.device("meta"):
        model = cls.from_config(config)
    state = {}
    try:
        for f in files:
            state.update(read_cast(f, dtype))
        result = model.load_state_dict(state, strict=False, assign=True)
    except (KeyError, RuntimeError):  # a dtype this reader does not know (fp8), shapes the config does not have
        return None
    if result.missing_keys or result.unexpected_keys or \
            any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        return None  # an older key layout diffusers converts, or state the file does not hold
    model.register_to_config(_name_or_path=str(base))
    return model.eval()
