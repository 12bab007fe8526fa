"""--cache_latents_to_disk: each image's VAE posterior in a file of its own, keyed by what makes it, reused by
later runs, so a large data set's latents are read per batch instead of held in RAM.

An entry is DIR/<k[:2]>/<k>.safetensors, where k is the sha256 of everything that changes the latent: the
image file's bytes (a `datasets` row's decoded pixels), the VAE (config, and weights as loaded, so dtype too),
the layout (image size, bucket, resize, crop box, flip), the pixel code's version (trainset.PIXELS_VERSION),
the loss mask (a mask file's bytes) and this format's VERSION. Change any of it and the key changes: a stale
entry is never read, it just stays unused (the folder is safe to delete). An entry holds `posterior`
[2C, h, w] fp32 (mean | logvar), `mask` [1, h, w] when the row has one, and in its header the VAE output's
memory layout and a checksum over the key, names, shapes and bytes: a damaged entry is found and re-encoded.

Writes go to a hidden temp file that is then linked into place (sdlora.io): an entry appears whole or not at
all, and the first writer wins, so two runs building the same entries never swap one under a reader. Entries
are not fsynced: one a power cut emptied fails its checksum and is encoded again.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from .. import io
from ..data import trainset
from ..data.images import read_image

VERSION = 1  # of what an entry holds and how its key is made
TAG = b"Signature: 8a477f597d28d172789f06886806bc55\n# sdlora's latent cache; backup tools skip this folder\n"


def default_dir() -> Path:
    """$XDG_CACHE_HOME/sdlora/latents, else ~/.cache/sdlora/latents: beside pip's and the Hub's caches."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdlora" / "latents"


def _hash_tensors(h, tensors: dict):
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def vae_id(vae) -> str:
    """The VAE as it encodes: its config and its weights as loaded (their dtype included), wherever they came
    from — a VAE replaced in place changes it, the same weights under another path or Hub cache do not."""
    h = hashlib.sha256(json.dumps({k: v for k, v in vae.config.items() if not k.startswith("_")},
                                  sort_keys=True, default=str).encode())
    _hash_tensors(h, vae.state_dict())
    return h.hexdigest()


def content_id(source) -> str:
    """sha256 of an image or mask file's bytes; of the decoded pixels for a `datasets` row (it has no file)."""
    if callable(source):
        img = read_image(source)
        return hashlib.sha256(f"{img.mode}{img.size}".encode() + img.tobytes()).hexdigest()
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()


def _checksum(key: str, tensors: dict, layout: str) -> str:
    h = hashlib.sha256(f"{key}:{layout};".encode())
    _hash_tensors(h, tensors)
    return h.hexdigest()


class LatentStore:
    """The entries under `root` for one VAE (`vae_id`)."""

    def __init__(self, root: Path, vae: str):
        self.root, self.vae = Path(root), vae

    def key(self, data: trainset.TrainSet, row_id: int, seed: int) -> str:
        row = data.rows[row_id]
        mask = row.mask if row.mask in (None, "alpha") else content_id(row.mask)  # "alpha": in the image's bytes
        what = {"version": VERSION, "pixels": trainset.PIXELS_VERSION, "image": content_id(row.image),
                "vae": self.vae, "layout": asdict(data.layout(row_id, seed, 0)), "mask": mask}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"  # 256 sub-folders: no folder of 100k files

    def read(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(posterior, mask or None, whether the VAE gave it channels-last); FileNotFoundError when there is no
        entry, ValueError saying what is wrong with a damaged one."""
        from safetensors.torch import load

        raw = self.path(key).read_bytes()
        try:
            n = int.from_bytes(raw[:8], "little")
            meta = json.loads(raw[8:8 + n])["__metadata__"]
            tensors = load(raw)
            ok = meta["checksum"] == _checksum(key, tensors, meta["layout"])
        except Exception as e:  # noqa: BLE001 - any damage: length, JSON, offsets, dtypes, missing fields
            raise ValueError(f"unreadable: {type(e).__name__}") from None
        if not ok:
            raise ValueError("its checksum does not match its contents")
        return tensors["posterior"], tensors.get("mask"), meta["layout"] == "channels_last"

    def write(self, key: str, posterior: torch.Tensor, mask: torch.Tensor | None, channels_last: bool,
              replace: bool = False):
        """Write an entry; an existing one is kept unless `replace` (a damaged one)."""
        tensors = {"posterior": posterior, **({"mask": mask} if mask is not None else {})}
        layout = "channels_last" if channels_last else "contiguous"
        data = io.safetensors_bytes(tensors, {"checksum": _checksum(key, tensors, layout), "layout": layout})
        if not (self.root / "CACHEDIR.TAG").exists():
            io.write_bytes(self.root / "CACHEDIR.TAG", TAG, replace=False, elsewhere="another --latents_cache_dir")
        # No fsync (7x the write's cost): an entry a power cut leaves empty fails its checksum and is encoded again.
        io.write_bytes(self.path(key), data, replace=replace, sync=False, elsewhere="another --latents_cache_dir")
