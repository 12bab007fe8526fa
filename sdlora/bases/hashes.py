"""A single-file base's hashes as A1111 and Civitai match a LoRA to its base (kohya's sd-scripts write them as
ss_sd_model_hash and ss_new_sd_model_hash): the old A1111 hash (sha256 of the 64 KiB at offset 1 MiB, 8 hex digits)
and the full file's sha256 (A1111's "AutoV2" shows its first 10 digits; Civitai looks models up by it). Computed
once per file and process (size and modification time are part of the key)."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000


def of(path: str | Path) -> dict[str, str]:
    """{"legacy": old A1111 hash, "sha256": the file's sha256} of a checkpoint file."""
    p = Path(path)
    st = p.stat()
    return dict(_hashes(str(p.resolve()), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _hashes(path: str, size: int, mtime: int) -> tuple:
    full = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(LEGACY_OFFSET)
        legacy = hashlib.sha256(f.read(LEGACY_LENGTH)).hexdigest()[:8]
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            full.update(chunk)
    return ("legacy", legacy), ("sha256", full.hexdigest())
