#!/usr/bin/env python
"""Peak memory and seconds per step of the real trainer with --quantize_base none / int8 / nf4.

Each mode runs sdlora's training loop (as train_step.py's `trainer`: data, caches, VAE/text encoder, logging) in
its own process, so each peak is its own: on CPU peak RSS per phase (load UNet, train) from the loop's `phase:`
log lines (train_step.Phases), the run's peak being the highest phase's; on a GPU torch.cuda.max_memory_allocated.
frozen_unet_mb: the bytes of the UNet's frozen weights as trained. Times are the median of --steps after --warmup.
The arch's pipeline is built once with random weights (sdlora.tiny; sd15: SD 1.5's published configs, ~4 GB on
disk) unless --model names one. Prints JSON.

    python benchmarks/quantized_base.py --arch tiny
    python benchmarks/quantized_base.py --arch sd15 --resolution 256
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step's trainer_run


def measure(a) -> dict:
    import logging

    from train_step import trainer_run

    from sdlora import quantize
    from sdlora.training import loop
    from sdlora.training.hooks import Hooks

    config, recipe, phases = trainer_run(a, ["--quantize_base", a.only] +
                                         ["--gradient_checkpointing"] * a.gradient_checkpointing)
    held, times = {}, []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loop.train(config, recipe, Hooks(on_step=lambda step, logs: times.append(logs["s_per_step"]),
                                     on_trainable=lambda parts: held.update(unet=parts["unet"].bare)))
    unet = held["unet"]
    frozen = [t for t in unet.parameters() if not t.requires_grad]
    phases.emit(logging.makeLogRecord({"msg": "phase: end"}))  # the last phase's peak
    # Phases resets the kernel's high-water mark at each phase, so the run's peak RSS is the highest phase's
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        max(v["peak_rss_mb"] for v in phases.result.values()) * 2**20
    res = {"s_per_step": statistics.median(times[a.warmup:]), "peak_mb": round(peak / 2**20),
           "frozen_unet_mb": round(sum(t.untyped_storage().nbytes() for t in frozen) / 2**20),
           "quantized_linears": quantize.quantized_linears(unet) if a.only != "none" else 0}
    if device.type == "cpu":
        res["phases"] = {k: v for k, v in phases.result.items() if k in ("load UNet", "train")}
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", choices=["tiny", "sd15"])
    p.add_argument("--model", default=None, help="an existing pipeline folder instead of building --arch")
    p.add_argument("--modes", default="none,int8,nf4")
    p.add_argument("--resolution", type=int, default=None, help="default: 32 for tiny, 256 for sd15")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.resolution = a.resolution or {"tiny": 32}.get(a.arch, 256)
    if a.only:  # child process: one mode
        print(json.dumps(measure(a)))
        return

    if a.model is None:
        from sdlora.tiny import make_tiny

        a.model = str(make_tiny(Path(tempfile.mkdtemp(prefix=f"bench-{a.arch}-")) / "model", arch=a.arch))
    results = {}
    for mode in a.modes.split(","):
        cmd = [sys.executable, __file__, "--only", mode, "--model", a.model] + [
            x for k, v in vars(a).items() if k not in ("only", "model", "arch", "modes") and v is not None
            for x in ([f"--{k}"] if v is True else [] if v is False else [f"--{k}", str(v)])]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
        if out.returncode:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    cuda = torch.cuda.is_available()
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
                   + (f", {torch.cuda.get_device_name()}" if cuda else ", CPU only"),
        "torch": torch.__version__, "bitsandbytes": _version("bitsandbytes"), "threads": torch.get_num_threads(),
        "arch": a.arch, "resolution": a.resolution, "batch": a.batch, "precision": a.precision, "rank": a.rank,
        "gradient_checkpointing": a.gradient_checkpointing, "steps_measured": a.steps,
        "peak": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (whole run; phases: each phase's own)",
        "modes": {m: {**r, "s_per_step": round(r["s_per_step"], 3)} for m, r in results.items()},
    }
    if "none" in results:
        base = results["none"]
        report["vs_none"] = {m: {"peak": round(r["peak_mb"] / base["peak_mb"], 3),
                                 "s_per_step": round(r["s_per_step"] / base["s_per_step"], 3)}
                             for m, r in results.items() if m != "none"}
    print(json.dumps(report, indent=2))


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
