#!/usr/bin/env python
"""Images per second of `sdlora caption` for each family's smallest real architecture, with random weights built
from the published config values (sdlora/caption/random_models.py: BLIP base, Florence-2 base, the WD14 ViT tagger).
The captions are noise, so only the speed means anything; the words the real weights write are not judged here.

Each model captions --images photo-sized images (dry run: nothing written) after one warm-up batch, through the same
captioner, device and precision choice as the command; the generated length is fixed with --max_length.

    python benchmarks/caption_speed.py --images 8 --max_length 30
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    import os

    return f"{name}, {os.cpu_count()} cores"


def measure(family: str, folder: Path, data: Path, a) -> dict:
    from sdlora.caption import folder as planning
    from sdlora.caption import models
    from sdlora.caption.run import caption_folder

    source = models.identify(str(folder))
    device, dtype = models.device_and_precision(a.device, a.dtype)
    captioner = models.load(source, device, dtype, max_length=a.max_length)
    plan = planning.plan(data)
    warm = planning.Plan(plan.folder, plan.extension, plan.items[:a.batch_size])
    caption_folder(warm, captioner, batch_size=a.batch_size, dry_run=True)
    start = time.perf_counter()
    summary = caption_folder(plan, captioner, batch_size=a.batch_size, dry_run=True)
    seconds = time.perf_counter() - start
    n = len(summary.written) + len(summary.skipped)
    return {"family": family, "device": device, "precision": "fp32 (ONNX)" if family == "wd14" else dtype,
            "images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=8, help="images captioned per model (after one warm-up batch)")
    p.add_argument("--batch_size", type=int, default=1, help="images per forward pass")
    p.add_argument("--max_length", type=int, default=30, help="new tokens per caption (captioners)")
    p.add_argument("--families", default="wd14,blip,florence2", help="comma-separated: wd14, blip, florence2")
    p.add_argument("--device", help="default: as sdlora caption chooses")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: as sdlora caption chooses")
    a = p.parse_args()
    from PIL import Image

    from sdlora.caption import random_models

    builders = {"blip": random_models.blip, "florence2": random_models.florence2, "wd14": random_models.wd14}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for i in range(a.images):
            Image.effect_mandelbrot((768, 512), (-2 + i / 10, -1, 1, 1), 100).convert("RGB").save(data / f"{i}.png")
        for family in a.families.split(","):
            folder = builders[family](Path(tmp) / family, size="real")
            results.append(measure(family, folder, data, a))
            print(json.dumps(results[-1]), flush=True)
    print(f"CPU: {cpu_name()}; max_length {a.max_length}, batch size {a.batch_size}")


if __name__ == "__main__":
    main()
