"""Resumable checkpoints: output_dir/checkpoint-N, each written whole or not at all.

A checkpoint holds only what changes during training — the LoRA weights (safetensors), the
optimizer, LR-scheduler and grad-scaler states, the step, and the settings of the run that
wrote it — never the frozen base model. `read` checks all of it before any model is loaded,
so a damaged or foreign checkpoint is one line, not a traceback minutes later.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..io import remove_dir, safetensors_bytes, torch_bytes, write_folder
from .manifest import Manifest

log = logging.getLogger(__name__)
NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written or half-pruned one has no state.json and is skipped)."""
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = NAME.match(p.name)
            if m and (p / "state.json").is_file():
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
    if not (p / "state.json").is_file():
        raise UserError(f"--resume_from_checkpoint {resume}: no complete checkpoint there "
                        f"(expected {p}/state.json); use 'latest' or a checkpoint-N folder")
    return p


def lora_weights(model) -> dict[str, torch.Tensor]:
    """The adapter's weights: peft's state dict, except AdaLoRA's, whose peft state dict is cut down to the ranks
    kept (through a method only peft's own model wrapper has) where a resume needs every weight as it is: those
    are saved by parameter name."""
    from peft.utils import get_peft_model_state_dict

    if _is_adalora(model):
        return {n: p.detach().float() for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().float() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def _is_adalora(model) -> bool:
    return any(hasattr(m, "lora_E") for m in model.modules())


def save(output_dir: Path, step: int, models: dict, optimizer, lr_scheduler, scaler, seed: int, settings: dict,
         total_limit: int | None, best_val_loss: list | None = None, extra: dict | None = None,
         states: dict | None = None) -> Path | None:
    """Write checkpoint-`step` (serialised in memory first, so a full disk fails before anything moves). `extra`:
    {component: tensors} of AdaLoRA's rank-allocator state; `states`: {name: state dict} of the run's other
    stateful parts (OPTIONAL_STATES: the EMA, early stopping), each written as name.pt. Returns None, writing
    nothing, where a folder of that name is not sdlora's (see outdir.check); prunes only checkpoints sdlora's record
    lists."""
    final = output_dir / f"checkpoint-{step}"
    record = Manifest(output_dir)
    if final.exists() and not record.owns(final.name):
        log.warning("%s: not saved, a folder of that name that sdlora did not write is in the way", final)
        return None
    files = {}
    for name, model in models.items():
        files[f"{name}_lora.safetensors"] = safetensors_bytes(lora_weights(model))
    for name, tensors in (extra or {}).items():
        files[f"{name}_adalora.safetensors"] = safetensors_bytes(tensors)
    for name, state in (states or {}).items():
        files[f"{name}.pt"] = torch_bytes(state)
    files["optimizer.pt"] = torch_bytes(optimizer.state_dict())
    files["scheduler.pt"] = torch_bytes(lr_scheduler.state_dict())
    if scaler is not None:
        files["scaler.pt"] = torch_bytes(scaler.state_dict())
    state = {"global_step": step, "seed": seed, "settings": settings}
    if best_val_loss:
        state["best_val_loss"] = best_val_loss  # [loss, step]: a resumed run still reports the lowest one
    files["state.json"] = json.dumps(state, indent=2, sort_keys=True).encode()
    record.will_make(final)
    write_folder(final, files)
    # Prune only after the new checkpoint is complete, so a crash never leaves fewer than the limit.
    if total_limit:
        for old in [p for p in list_checkpoints(output_dir) if record.owns(p.name)][:-total_limit]:
            log.info("removing old checkpoint %s (--checkpoints_total_limit %d)", old.name, total_limit)
            remove_dir(old)
            record.forget(old.name)
    return final


@dataclass
class Checkpoint:
    path: Path
    step: int
    seed: int
    settings: dict  # the writing run's settings ({} for checkpoints older than the settings record)
    lora: dict[str, dict[str, torch.Tensor]]  # component -> {parameter name: weight} (lora_weights)
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    best_val_loss: list | None = None
    extra: dict = None  # component -> AdaLoRA rank-allocator state
    states: dict = None  # name -> state dict of OPTIONAL_STATES the checkpoint has


OPTIONAL_STATES = ("ema", "early_stopping")  # saved as NAME.pt where the run has one (`save`'s states)

# Settings that checkpoints written before the full settings record kept at the top level of state.json.
_OLD_KEYS = ("rank", "target_modules", "train_batch_size", "gradient_accumulation_steps", "num_processes",
             "train_text_encoder")


def read(path: Path, components: list[str]) -> Checkpoint:
    """Load and check everything in a checkpoint folder; every problem is a UserError naming the file."""
    from safetensors.torch import load_file

    state_file = path / "state.json"
    state = _read_state(state_file)
    settings = state.get("settings")
    if settings is None:
        settings = {k: state[k] for k in _OLD_KEYS if k in state}
    lora = {name: _read_lora(path, name, settings, state_file) for name in components}
    extra = {}
    for name in components:
        f = path / f"{name}_adalora.safetensors"
        if f.is_file():
            try:
                extra[name] = load_file(str(f))
            except Exception as e:
                raise UserError(f"{f}: unreadable ({type(e).__name__}); the checkpoint is damaged — resume from "
                                "another checkpoint-N or delete this one") from None
    blobs = _read_states(path)
    best = state.get("best_val_loss")
    best = best if isinstance(best, list) and len(best) == 2 and all(isinstance(v, (int, float)) for v in best) else None
    return Checkpoint(path, state["global_step"], state["seed"], settings, lora,
                      blobs["optimizer.pt"], blobs["scheduler.pt"], blobs["scaler.pt"], best, extra,
                      {n: blobs[f"{n}.pt"] for n in OPTIONAL_STATES if blobs[f"{n}.pt"] is not None})


def _read_state(state_file: Path) -> dict:
    """state.json: the step, the seed and the settings of the run that wrote it, checked for their types."""
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{state_file}: unreadable ({type(e).__name__}); the checkpoint is damaged — resume from "
                        "another checkpoint-N or delete this one") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int) or state["global_step"] < 0 \
            or not isinstance(state.get("seed"), int) or not isinstance(state.get("settings", {}), dict):
        raise UserError(f"{state_file}: missing or malformed global_step/seed/settings; the checkpoint is damaged — "
                        "resume from another checkpoint-N or delete this one")
    return state


def _read_lora(path: Path, name: str, settings: dict, state_file: Path) -> dict:
    """One trained model's LoRA weights: finite float tensors of the recorded rank."""
    from safetensors.torch import load_file

    rank = settings.get("rank")
    f = path / f"{name}_lora.safetensors"
    if not f.is_file():
        raise UserError(f"{path}: has no {f.name}; it was saved with different --train_text_encoder settings")
    try:
        sd = load_file(str(f))
    except Exception as e:  # truncated, garbage header, …
        raise UserError(f"{f}: unreadable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); "
                        "the checkpoint is damaged — resume from another checkpoint-N or delete this one") from None
    for k, v in sd.items():
        dims = (1, 4) if "lora_magnitude_vector" in k else (2, 4)  # DoRA magnitudes: [out], conv [1, out, 1, 1]
        if not v.is_floating_point() or v.dim() not in dims or not torch.isfinite(v).all():
            raise UserError(f"{f}: tensor {k} is not a finite LoRA weight; the checkpoint is damaged")
        if rank is not None and "lora_A" in k and v.shape[0] != rank and settings.get("lora_type") != "adalora":
            raise UserError(f"{f}: LoRA rank {v.shape[0]} but {state_file.name} says rank {rank}; "
                            "the checkpoint is damaged or mixed from two runs")
    return sd


def _read_states(path: Path) -> dict:
    """{"optimizer.pt", "scheduler.pt", "scaler.pt" (None without one): the saved state dict}."""
    blobs = {}
    for name in ("optimizer.pt", "scheduler.pt", "scaler.pt", *(f"{n}.pt" for n in OPTIONAL_STATES)):
        f = path / name
        if name not in ("optimizer.pt", "scheduler.pt") and not f.exists():
            blobs[name] = None
            continue
        try:  # our own files, but still loaded without unpickling arbitrary objects
            blobs[name] = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{f}: unreadable ({type(e).__name__}); the checkpoint is damaged — resume from "
                            "another checkpoint-N or delete this one") from None
        if not isinstance(blobs[name], dict):
            raise UserError(f"{f}: not a saved state; the checkpoint is damaged")
    return blobs


def differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(changed settings as 'name old -> new', settings the checkpoint did not record)."""
    current = json.loads(json.dumps(current))  # compare in the form state.json stores (lists, string keys)
    changed = [f"{k} {_show(k, saved[k])} -> {_show(k, v)}" for k, v in current.items() if k in saved and saved[k] != v]
    changed += [f"{k} {_show(k, saved[k])} -> (not used now)" for k in saved if k not in current]
    return changed, [k for k in current if k not in saved]


def _show(key, value) -> str:
    if key == "data" and isinstance(value, str):
        return value[:12]
    if value is None:
        return "(default)"
    return json.dumps(value) if not isinstance(value, str) else value


def apply(ckpt: Checkpoint, models: dict, optimizer, lr_scheduler, scaler):
    """Put a checked checkpoint's state into the freshly built models, optimizer and schedulers."""
    from peft.utils import set_peft_model_state_dict

    for name, model in models.items():
        if _is_adalora(model):
            res = model.load_state_dict(ckpt.lora[name], strict=False)
            trained = {n for n, p in model.named_parameters() if p.requires_grad}
            res.missing_keys[:] = [k for k in trained if k not in ckpt.lora[name]]
        else:
            res = set_peft_model_state_dict(model, ckpt.lora[name])
        missing = [k for k in getattr(res, "missing_keys", []) if "lora_" in k]
        if getattr(res, "unexpected_keys", None) or missing:
            raise UserError(f"{ckpt.path / f'{name}_lora.safetensors'}: LoRA keys do not match this model "
                            "(different --rank/--target_modules or base model?)")
    try:
        optimizer.load_state_dict(ckpt.optimizer)
        lr_scheduler.load_state_dict(ckpt.scheduler)
        if scaler is not None and ckpt.scaler is not None:
            scaler.load_state_dict(ckpt.scaler)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise UserError(f"{ckpt.path}: optimizer/scheduler state does not fit this run "
                        f"({str(e).splitlines()[0][:120]}); resume with the settings it was saved with") from None
