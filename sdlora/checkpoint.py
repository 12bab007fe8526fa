"""Resumable checkpoints: output_dir/checkpoint-N, each written whole or not at all.

A checkpoint holds only what changes during training — the LoRA weights (safetensors), the
optimizer, LR-scheduler and grad-scaler states, and the step — never the frozen base model.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch

from .errors import UserError
from .io import atomic_dir

log = logging.getLogger(__name__)
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one has no state.json and is ignored)."""
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = _NAME.match(p.name)
            if m and (p / "state.json").exists():
                found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find(output_dir: Path, resume: str) -> Path | None:
    """Resolve --resume_from_checkpoint: 'latest' (None when there is none yet) or a path."""
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not p.is_absolute() and not p.exists():
        p = output_dir / resume
    if not (p / "state.json").exists():
        raise UserError(f"--resume_from_checkpoint {resume}: no complete checkpoint there "
                        f"(expected {p}/state.json); use 'latest' or a checkpoint-N folder")
    return p


def save(output_dir: Path, step: int, models: dict, optimizer, lr_scheduler, scaler, state: dict,
         total_limit: int | None) -> Path:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    final = output_dir / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        for name, model in models.items():
            sd = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
            save_file(sd, str(tmp / f"{name}_lora.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "global_step": step}, indent=2))
    # Prune only after the new checkpoint is complete, so a crash never leaves fewer than the limit.
    if total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            log.info("removing old checkpoint %s (--checkpoints_total_limit %d)", old.name, total_limit)
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


def load(path: Path, models: dict, optimizer, lr_scheduler, scaler) -> dict:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name, model in models.items():
        f = path / f"{name}_lora.safetensors"
        if not f.exists():
            raise UserError(f"{path}: has no {f.name}; it was saved with different --train_text_encoder settings")
        res = set_peft_model_state_dict(model, load_file(str(f)))
        if getattr(res, "unexpected_keys", None):
            raise UserError(f"{f}: LoRA keys do not match this model (different --rank/--target_modules?)")
    # Our own files, but still loaded without unpickling arbitrary objects.
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    return read_state(path)
