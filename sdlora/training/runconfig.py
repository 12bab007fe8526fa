"""The resolved settings a run writes into its output folder (`sdlora-config.toml`, every flag's value): the run can
be repeated from it (--config_file) or resumed with no flags but the folder (--resume_from_checkpoint)."""
from __future__ import annotations

from pathlib import Path

from ..io import write_bytes
from . import manifest

NAME = "sdlora-config.toml"


def write(output_dir: Path, text: str):
    """Write the settings (main process, the folder held): recorded first, so only sdlora's own file is replaced."""
    record = manifest.Manifest(output_dir)
    record.will_write(NAME)
    write_bytes(Path(output_dir) / NAME, text.encode("utf-8"))
    record.wrote(NAME)
