#!/usr/bin/env python
"""Peak CPU memory of loading a base in bf16 from a diffusers folder against the same weights as one single-file
checkpoint (original layout): the UNet, VAE and text encoder(s), as a bf16 training run loads them.

Modes, each in its own process (its own peak RSS: VmHWM, after every weight has been read once, so that
memory-mapped weights count as they will once training touches them):
  folder       sdlora's folder load (models.load_*: safetensors read and cast one tensor at a time)
  single-file  sdlora's single-file load (bases.load.part: each component's tensors read and cast one at a time,
               handed to diffusers' from_single_file / its CLIP loader)
  diffusers    diffusers' own Stable Diffusion (XL) pipeline from_single_file(config=…, torch_dtype=bf16), for
               reference
The arch's pipeline is built once with random weights (sdlora.tiny; sd15: SD 1.5's published configs; sdxl: SDXL
base 1.0's, built and stored in bf16 to fit a 24 GB machine) and written as a single file with `sdlora
convert-base` (the same dtype as stored). Prints JSON.

    python benchmarks/single_file_memory.py --arch sd15
    python benchmarks/single_file_memory.py --arch sdxl --work /tmp/bench
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build(arch: str, work: Path) -> tuple[Path, Path]:
    import torch

    from sdlora.bases import ldm
    from sdlora.tiny import make_tiny

    folder, file = work / f"{arch}-folder", work / f"{arch}.safetensors"
    if not (folder / "model_index.json").exists():
        if arch == "sdxl":
            torch.set_default_dtype(torch.bfloat16)
        make_tiny(folder, arch=arch)
        torch.set_default_dtype(torch.float32)
    if not file.exists():
        ldm.write(folder, file)
    return folder, file


def peak_rss_mb() -> int:
    """This process's peak resident memory: the kernel's VmHWM, which is this program's own (getrusage's ru_maxrss
    carries the parent's peak across fork and exec, and the parent built the model)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def load(mode: str, folder: str, file: str) -> dict:
    import torch

    from sdlora import models
    from sdlora.bases import load as bases

    dtype, t0 = torch.bfloat16, time.perf_counter()
    family = models.family(folder)
    names = ["unet", "vae", *(models.TEXT_ENCODERS if family == "sdxl" else models.TEXT_ENCODERS[:1])]
    if mode == "diffusers":
        import diffusers

        cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
        pipe = cls.from_single_file(file, config=folder, torch_dtype=dtype, local_files_only=True,
                                    **({} if family == "sdxl" else {"safety_checker": None}))
        parts = [getattr(pipe, n) for n in names]
    else:
        base, config = (file, folder) if mode == "single-file" else (folder, None)
        parts = [bases.part(n, base, config, dtype=dtype) for n in names]
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # read every weight once, as training does: memory-mapped weights become resident
        for m in parts:
            for p in m.parameters():
                p.sum()
    weights = sum(p.numel() * p.element_size() for m in parts for p in m.parameters())
    return {"peak_rss_mb": peak_rss_mb(),
            "weights_mb": round(weights / 2**20), "seconds": round(seconds, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sd15", choices=["tiny", "sd15", "sdxl-tiny", "sdxl"])
    p.add_argument("--work", default="/tmp/sdlora-single-file-bench", help="where the models are built (kept)")
    p.add_argument("--modes", default="folder,single-file,diffusers")
    p.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one:
        print(json.dumps(load(*a._one)))
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    folder, file = build(a.arch, work)
    out = {"arch": a.arch, "cpu": cpu_name(), "dtype": "bf16", "file_mb": round(file.stat().st_size / 2**20)}
    for mode in a.modes.split(","):
        r = subprocess.run([sys.executable, __file__, "--_one", mode, str(folder), str(file)], capture_output=True,
                           text=True, cwd=ROOT)
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else r.stderr[-500:]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
