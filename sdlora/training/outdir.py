"""The output folder a training run owns: one run at a time, what interrupted runs left is cleared, and a folder
with files sdlora did not write is refused (or, with --overwrite_output_dir, written beside them, never over them).

The lock is an OS file lock (flock) on `output_dir/.sdlora.lock`: the kernel drops it when the
holder exits, even on kill -9, so there is never a stale lock to delete by hand. The file
names the holder so the second run can say who has the folder. What sdlora wrote there is
listed in `.sdlora-files.json` (manifest.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from ..errors import UserError
from ..io import TMP_NAME, remove_dir
from ..lora.formats import WEIGHTS_NAME
from ..output.weights import kohya_name
from . import manifest, runconfig
from .checkpoint import NAME as CHECKPOINT_NAME
from .checkpoint import find, list_checkpoints

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


def remove_leftovers(output_dir: Path, record: manifest.Manifest | None = None) -> list[str]:
    """Delete what killed runs left in `output_dir` (call with the lock held); returns the names removed.

    Only names that carry sdlora's temp marker (`.<name>.<16 hex>.sdlora-tmp`: atomic writes, half-done
    prunes), in the folder and in the folders the record lists as sdlora's (samples/, …).
    """
    record = record or manifest.Manifest(output_dir)
    removed = []
    for folder in (output_dir, *(output_dir / n for n in sorted(record.folders))):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for p in folder.iterdir():
            if not TMP_NAME.fullmatch(p.name):
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
def claim(config, holder: bool = True):
    """Hold `config.output_dir` for one run: lock it, clear what killed runs left, and refuse (before any model
    loads) a folder this run must not write into (`holder=False`: another process of this run holds it)."""
    output_dir = config.output_dir
    lock = OutputLock(output_dir) if holder else None
    try:
        record = manifest.Manifest(output_dir)
        if holder:
            remove_leftovers(output_dir, record)
            record.prune()
            for old in check(config, record):
                log.info("removing %s of an earlier run (%s)", old.name, FLAG)
                remove_dir(old)
                record.forget(old.name)
        elif config.resume_from_checkpoint or not config.overwrite_output_dir:
            check(config, record)  # the same answer as the holder's (who may be deleting checkpoints otherwise)
        yield
    finally:
        if lock is not None:
            lock.release()


FLAG = "--overwrite_output_dir"


def check(config, record: manifest.Manifest) -> list[Path]:
    """Refuse a folder of someone else's (a new run), an earlier run's output (a new run without the flag) and any
    name this run would write that is not sdlora's (always). Returns sdlora's own earlier checkpoints, which a new
    run with the flag replaces (they would pass for this run's with --resume_from_checkpoint latest)."""
    out, resume, again = config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir
    inputs = [Path(p).absolute() for p in config.inputs]
    entries = sorted(p.name for p in out.iterdir() if p.name not in (LOCK_NAME, manifest.NAME)
                     and not TMP_NAME.fullmatch(p.name)
                     and not any(i == p.absolute() or p.absolute() in i.parents for i in inputs))
    theirs = [n for n in entries if not record.owns(n)]
    earlier = list_checkpoints(out)
    old = "" if record.found or not (earlier or WEIGHTS_NAME in entries) else \
        f" (an sdlora version older than its record of the files it writes, {manifest.NAME}, made them)"
    if earlier and not resume and (not again or not all(record.owns(p.name) for p in earlier)):
        more = f" and {len(earlier) - 1} more" if len(earlier) > 1 else ""
        over = f", start over with {FLAG} (they are deleted first)" if record.found and not again else ""
        raise UserError(f"--output_dir {out} holds checkpoints of an earlier run ({earlier[-1].name}{more}){old}: "
                        f"continue it with --resume_from_checkpoint latest{over}, or choose another --output_dir")
    if theirs and not resume and not again:
        raise UserError(f"--output_dir {out} holds files sdlora did not write ({_some(theirs)}){old}: choose a new or "
                        f"empty --output_dir, or pass {FLAG} to write beside them (sdlora never changes them)")
    clash = [n for n in _names_written(config) if (out / n).exists() or (out / n).is_symlink()]
    every, start = config.checkpointing_steps, _resumed_step(out, resume)
    clash += [n for n in entries if (m := CHECKPOINT_NAME.match(n)) and every and int(m[1]) > start
              and int(m[1]) % every == 0]  # the checkpoints this run saves (a Stop's aside: see checkpoint.save)
    clash = sorted({n for n in clash if not record.owns(n)})
    if clash:
        raise UserError(f"--output_dir {out}: {_some(clash)} {'is' if len(clash) == 1 else 'are'} not sdlora's (or "
                        f"changed since it wrote them){old}, and this run writes there: move them away, or choose "
                        "another --output_dir")
    lora = [n for n in (WEIGHTS_NAME, kohya_name(out)) if n in entries]
    if lora and not resume and not again:
        raise UserError(f"--output_dir {out} holds the LoRA of an earlier sdlora run ({_some(lora)}): pass {FLAG} "
                        "to replace it, or choose another --output_dir")
    return [] if resume else earlier


def _resumed_step(out: Path, resume: str | None) -> int:
    """The step of the checkpoint a resume starts from (its folder's name), else 0."""
    found = find(out, resume) if resume else None
    m = found and CHECKPOINT_NAME.match(found.name)
    return int(m[1]) if m else 0


def _names_written(config) -> list[str]:
    """The names this run writes directly in its folder (checkpoint-N aside)."""
    names = [WEIGHTS_NAME, kohya_name(config.output_dir), "README.md", runconfig.NAME]
    logs = Path(config.logging_dir)
    if not logs.is_absolute() and logs.parts and logs.parts[0] != "..":
        names.append(logs.parts[0])  # the UI writes its log there whatever --report_to says
    if config.validation_prompt or config.sample_prompts:
        names.append("samples")
    return names


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
