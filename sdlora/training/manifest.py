"""The record of what sdlora wrote in an output folder (`.sdlora-files.json`): it replaces or deletes nothing else.

Names are the folder's own entries: files with the SHA-256 they had when sdlora wrote them (a file changed since,
such as a README.md the user edited, is the user's now), and folders sdlora made (checkpoint-N, samples/, logs/,
class images), which are its own inside. A name is recorded *before* it is created, so a killed run never leaves
an entry of its own unrecorded; a file is recorded without a hash (`null`) until written. Only the process that
holds the folder's lock writes the record, atomically.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError
from ..io import write_bytes

NAME = ".sdlora-files.json"


class Manifest:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / NAME
        self.found = self.path.is_file()
        self.files: dict[str, str | None] = {}
        self.folders: set[str] = set()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8")) if self.found else {}
            self.files = {str(k): v if isinstance(v, str) else None for k, v in dict(data.get("files", {})).items()}
            self.folders = {str(n) for n in data.get("folders", [])}
        except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError):
            self.found = False  # unreadable: nothing is provably sdlora's

    def owns(self, name: str) -> bool:
        """Whether the entry `name` is sdlora's: recorded, and a file still holds what sdlora wrote."""
        p = self.folder / name
        if name in self.folders:
            return p.is_dir() and not p.is_symlink()
        if name in self.files:
            if not p.is_file() or p.is_symlink():
                return False
            return self.files[name] is None or _sha256(p) == self.files[name]
        return False

    def will_write(self, *names: str):
        """Record files before they are (re)written: until `wrote`, whatever they hold counts as sdlora's. A name
        taken by a file of someone else's (put there, or changed, while the run went on) is a UserError."""
        if theirs := [n for n in names if (self.folder / n).exists() and not self.owns(n)]:
            raise UserError(f"{self.folder / theirs[0]}: not sdlora's (it appeared or changed while the run went on), "
                            f"so nothing was written over it; move it away and run again")
        if any(self.files.get(n, "") is not None for n in names):
            self.files.update({n: None for n in names})
            self.save()

    def wrote(self, *names: str):
        self.files.update({n: _sha256(self.folder / n) for n in names})
        self.save()

    def will_make(self, path: Path):
        """Record the folder of `path` that sits directly in this folder, before it is made; one that exists and is
        not recorded is left unrecorded (a user's folder: an input such as --class_data_dir)."""
        try:
            name = Path(path).absolute().relative_to(self.folder.absolute()).parts[0]
        except (ValueError, IndexError):
            return  # outside this folder
        if name not in self.folders and not (self.folder / name).exists():
            self.folders.add(name)
            self.save()

    def forget(self, *names: str):
        for n in names:
            self.files.pop(n, None)
            self.folders.discard(n)
        self.save()

    def prune(self):
        """Drop entries whose file or folder is gone (recorded by a run killed before it made them)."""
        gone = [n for n in [*self.files, *self.folders] if not (self.folder / n).exists()]
        if gone:
            self.forget(*gone)

    def save(self):
        data = {"about": "what sdlora wrote in this folder: it replaces or deletes only these (files: their SHA-256)",
                "files": dict(sorted(self.files.items())), "folders": sorted(self.folders)}
        write_bytes(self.path, json.dumps(data, indent=1).encode())
        self.found = True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def remove_if_alone(folder: Path, also: tuple[str, ...] = ()):
    """Delete the record of a folder that holds nothing else (a run that failed before writing anything), and the
    files `also` beside it that the record says are sdlora's (the run's settings)."""
    try:
        names = {p.name for p in Path(folder).iterdir()}
        if NAME in names and names <= {NAME, *also}:
            record = Manifest(folder)
            if all(record.owns(n) for n in names - {NAME}):
                for n in sorted(names - {NAME}) + [NAME]:
                    (Path(folder) / n).unlink()
    except OSError:
        pass
