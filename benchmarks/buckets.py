#!/usr/bin/env python
"""Aspect-ratio buckets against square crops: seconds per step at (nearly) equal pixels per batch, whether
latents are cached, and how much of each image survives. Same model, same step count, one process each.

  square   a folder of square images at --resolution (every batch resolution² pixels per image)
  buckets  the mixed photo shapes of sdlora.testing.PHOTO_SHAPES, bucketed (areas 0.8-1.0 x resolution²)

    python benchmarks/buckets.py --arch tiny --resolution 64
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(a, data: Path) -> dict:
    """One training run in this process; the step times the loop reports, and what it logged."""
    import logging

    from sdlora.recipes import text_to_image as t2i
    from sdlora.cli.flags import train_config
    from sdlora.training.loop import train

    lines = []
    handler = logging.Handler()
    handler.emit = lambda rec: lines.append(rec.getMessage())
    logging.getLogger("sdlora").addHandler(handler)
    logging.getLogger("sdlora").setLevel(logging.INFO)
    argv = ["--pretrained_model_name_or_path", a.model, "--train_data_dir", str(data), "--output_dir",
            tempfile.mkdtemp(prefix="bench-out-"), "--resolution", str(a.resolution), "--train_batch_size",
            str(a.batch), "--max_train_steps", str(a.warmup + a.steps), "--report_to", "none", "--seed", "0",
            "--checkpointing_steps", "1000000", "--center_crop"]
    args = t2i.parse_args(argv)
    config = train_config(args)
    recipe = t2i.make_recipe(args, config)
    times = []
    train(config, recipe, on_step=lambda step, logs: times.append(logs["s_per_step"]))
    px = [b[0] * b[1] for b in (recipe.data.buckets[r] for r in recipe.data.used_rows())]
    log = "\n".join(lines)
    kept = re.search(r"([\d.]+)% of each image's area kept", log)
    return {"s_per_step": statistics.median(times[a.warmup:]), "mean_pixels_per_image": statistics.mean(px),
            "latents_cached": "cached VAE latents" in log, "kept_percent": float(kept.group(1)) if kept else None,
            "buckets": re.search(r"(aspect-ratio buckets.*?:.*?);|(square .*? crops)", log).group(0)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", choices=["tiny", "sd15"])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--copies", type=int, default=4, help="copies of each photo shape (6 shapes)")
    p.add_argument("--only", choices=["square", "buckets"], help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only:
        print(json.dumps(measure(a, Path(a.data))))
        return

    from PIL import Image

    from sdlora.testing import photo_folder
    from sdlora.tiny import make_tiny

    tmp = Path(tempfile.mkdtemp(prefix="bench-buckets-"))
    a.model = str(make_tiny(tmp / "model", arch=a.arch))
    scale = max(1, a.resolution // 64)
    photos = photo_folder(tmp / "buckets", scale=scale, copies=a.copies)
    square = tmp / "square"
    square.mkdir()
    for i, f in enumerate(sorted(photos.glob("*.png"))):  # the same number of images, cut square
        im = Image.open(f).convert("RGB")
        s = min(im.size)
        im.crop((0, 0, s, s)).save(square / f"{i}.png")
        (square / f"{i}.txt").write_text(f.with_suffix(".txt").read_text())
    results = {}
    for kind, data in (("square", square), ("buckets", photos)):
        cmd = [sys.executable, __file__, "--only", kind, "--model", a.model, "--data", str(data),
               "--arch", a.arch, "--resolution", str(a.resolution), "--batch", str(a.batch),
               "--steps", str(a.steps), "--warmup", str(a.warmup)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
        if out.returncode:
            sys.exit(f"{kind} failed:\n{out.stderr[-3000:]}")
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    import torch

    sq, bk = results["square"], results["buckets"]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{'CUDA' if torch.cuda.is_available() else 'CPU only'}",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "arch": a.arch,
        "resolution": a.resolution, "batch": a.batch, "steps_measured": a.steps, **results,
        "buckets_vs_square_s_per_step": round(bk["s_per_step"] / sq["s_per_step"], 3),
        "buckets_vs_square_s_per_megapixel": round(bk["s_per_step"] / bk["mean_pixels_per_image"]
                                                   / (sq["s_per_step"] / sq["mean_pixels_per_image"]), 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
