"""The output folder a training run owns: one run at a time, and what interrupted runs left is cleared.

The lock is an OS file lock (flock) on `output_dir/.sdlora.lock`: the kernel drops it when the
holder exits, even on kill -9, so there is never a stale lock to delete by hand. The file
names the holder so the second run can say who has the folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

from ..errors import UserError
from ..io import TMP_SUFFIX
from .checkpoint import FILES as CHECKPOINT_FILES
from .checkpoint import NAME as CHECKPOINT_NAME
from .checkpoint import list_checkpoints

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not serialised there
    fcntl = None

log = logging.getLogger(__name__)
LOCK_NAME = ".sdlora.lock"


class OutputLock:
    """Hold `output_dir` for this process until `release()` (or exit)."""

    def __init__(self, output_dir: Path, what: str = "--output_dir"):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd = None
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(f"{what} {output_dir} is in use by another sdlora run ({holder}); wait for it to "
                                f"finish or choose another {what}") from None
            try:  # the holder before us may have deleted the file on release: lock the file that is there now
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd

    def release(self):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held, so no one locks a file that is going away
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def remove_leftovers(output_dir: Path) -> list[str]:
    """Delete what killed runs left in `output_dir` (call with the lock held); returns the names removed.

    Only what sdlora itself writes: hidden `.<name>.<random>.tmp` files and folders (atomic writes,
    half-done prunes), safetensors' own `.tmpXXXX` files from older sdlora versions, and
    `checkpoint-N` folders without a state.json that hold nothing but checkpoint files.
    """
    removed = []
    for folder in (output_dir, output_dir / "samples"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            ours = (p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.name != LOCK_NAME) or \
                (re.fullmatch(r"\.tmp[A-Za-z0-9_]{4,}", p.name) and p.is_file())
            if folder == output_dir and CHECKPOINT_NAME.match(p.name) and p.is_dir() and not p.is_symlink() \
                    and not (p / "state.json").exists() and {c.name for c in p.iterdir()} <= CHECKPOINT_FILES:
                ours = True
            if not ours:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(str(p.relative_to(output_dir)))
    if removed:
        log.info("removed what an interrupted run left in %s: %s", output_dir, ", ".join(sorted(removed)))
    return removed


@contextlib.contextmanager
def claim(output_dir: Path, resume: str | None, holder: bool = True):
    """Hold `output_dir` for one run: lock it, clear what killed runs left, and refuse a folder that holds
    another run's checkpoints unless this run resumes (`holder=False`: another process of this run holds it)."""
    lock = OutputLock(output_dir) if holder else None
    try:
        if holder:
            remove_leftovers(output_dir)
        earlier = list_checkpoints(output_dir)
        if earlier and not resume:
            more = f" and {len(earlier) - 1} more" if len(earlier) > 1 else ""
            raise UserError(f"--output_dir {output_dir} holds checkpoints of an earlier run ({earlier[-1].name}{more}): "
                            "continue it with --resume_from_checkpoint latest, or choose another --output_dir")
        yield
    finally:
        if lock is not None:
            lock.release()
