"""Crash-safe, deterministic writes: a killed run never leaves a truncated file or clobbers a finished one.

Everything is serialised in memory first and written by `write_bytes` into a hidden temp file
beside its target, fsynced and renamed. So the file's mode follows the umask (safetensors'
own `save_file` renames its 0600 temp file over ours), a full disk is one line that says how
much space was needed, and safetensors headers come out in one key order (safetensors
serialises metadata from a hash map: same tensors, different bytes on every run).
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from .errors import UserError

# Hidden names this module writes, ".<name>.<16 hex>.sdlora-tmp": the marker proves a leftover is sdlora's, so
# `outdir.remove_leftovers` deletes these and nothing else (a user's ".backup.tmp" is not one of them).
TMP_SUFFIX = ".sdlora-tmp"
TMP_NAME = re.compile(r"\..+\.[0-9a-f]{16}" + re.escape(TMP_SUFFIX))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def disk_full(path: Path, need: int, elsewhere: str = "another output folder") -> UserError:
    """The one-line error for ENOSPC/EDQUOT: what could not be written and how much space it needs."""
    try:
        free = _mb(shutil.disk_usage(Path(path).parent if not Path(path).is_dir() else path).free) + " free"
    except OSError:
        free = "free space unknown"
    return UserError(f"{path}: could not write it, the disk is full (it needs {_mb(need)}, {free}); free some space "
                     f"or choose {elsewhere} — files written earlier are intact")


def _is_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def write_file(path: Path, data: bytes, sync: bool = True):
    """The one place bytes reach the disk (in place, fsynced unless `sync=False`); everything above adds atomicity."""
    with open(path, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, replace: bool = True):
    """Yield a temp path beside `path`; on success rename it over `path`.

    Same directory, so the rename is atomic on POSIX. On any error the temp file is removed
    and `path` keeps its previous content. `replace=False`: an existing `path` is kept (the
    first of several writers wins, so a file never changes under a reader).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_tmp(path)
    try:
        yield tmp
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _link_new(tmp: Path, path: Path):
    """Give `tmp` the name `path` unless that exists: link() fails on an existing name where rename() replaces."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: the last writer wins, still atomically
        os.replace(tmp, path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def write_bytes(path, data: bytes, *, replace: bool = True, sync: bool = True,
                elsewhere: str = "another output folder"):
    """`data` as `path`, whole or not at all; `replace=False` keeps an existing file; `sync=False` skips the fsync
    (for files that carry a checksum: a power cut may empty them, never pass a bad one off); a full disk is one line
    that suggests `elsewhere`."""
    path = Path(path)
    try:
        with atomic_path(path, replace) as tmp:
            write_file(tmp, data, sync=sync)
    except OSError as e:
        if _is_full(e):
            raise disk_full(path, len(data), elsewhere) from None
        raise


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file in memory, with its JSON header written in sorted key order."""
    from safetensors.torch import save

    raw = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    # Offsets in the header are relative to the data section, so re-serialising it moves nothing.
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    return len(header).to_bytes(8, "little") + header + raw[8 + n:]


def save_safetensors(tensors: dict, path, metadata: dict[str, str] | None = None):
    write_bytes(path, safetensors_bytes(tensors, metadata))


def torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def png_bytes(image, pnginfo=None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo)
    return buf.getvalue()


def save_image(image, path, pnginfo=None):
    write_bytes(path, png_bytes(image, pnginfo))


def tmp_name(path: Path) -> Path:
    """A hidden, unique name beside `path` that matches TMP_NAME."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}{TMP_SUFFIX}")


def new_tmp(path: Path, folder: bool = False) -> Path:
    """Create an empty file (or folder) under a fresh `tmp_name`; its mode follows the umask."""
    while True:
        tmp = tmp_name(path)
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temp directory; on success it replaces `path` (an old `path` is removed only then)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_tmp(path, folder=True)
    try:
        yield tmp
        if path.exists():
            old = tmp_name(path)  # a unique name: two writers never fight over one ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_folder(path, files: dict[str, bytes]):
    """Write `files` ({name: bytes}) as the folder `path`, whole or not at all."""
    path = Path(path)
    try:
        with atomic_dir(path) as tmp:
            for name, data in files.items():
                write_file(tmp / name, data)
    except OSError as e:
        if _is_full(e):
            raise disk_full(path, sum(len(d) for d in files.values())) from None
        raise


def remove_dir(path: Path):
    """Delete a folder so that an interruption never leaves it half-deleted under its own name."""
    gone = tmp_name(path)
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)
