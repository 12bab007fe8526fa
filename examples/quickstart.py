#!/usr/bin/env python
"""The README's first command: train a style LoRA offline on CPU and show before/after.

1. base model: the bundled `sdlora-tiny` (a tiny SD1.x-architecture model trained from
   scratch, see docs/tiny-model.md); if it is missing, `sdlora make-tiny` builds a random one.
2. data: examples/data/pokemon — 32 px "creature-style" shapes with captions (imagefolder).
3. train: train_text_to_image_lora.py, exactly as a user would run it.
4. compare: the same prompts and seeds with and without the LoRA, loaded onto an unmodified
   diffusers pipeline with DPMSolverMultistepScheduler -> before_after.png.

    python examples/quickstart.py [--out demo] [--steps 300]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on a blue background", "a yellow square on a green background",
           "a blue triangle on a white background", "a green circle on a red background"]


def generate(pipe, prompts, seed=0, steps=20):
    import torch

    return [pipe(p, num_inference_steps=steps, guidance_scale=5.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(seed + i)).images[0] for i, p in enumerate(prompts)]


def grid(rows, scale=4):
    from PIL import Image

    w, h = rows[0][0].size
    out = Image.new("RGB", (w * scale * len(rows[0]), h * scale * len(rows)), "white")
    for r, imgs in enumerate(rows):
        for c, img in enumerate(imgs):
            out.paste(img.resize((w * scale, h * scale), Image.NEAREST), (c * w * scale, r * h * scale))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo")
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args()
    out = Path(a.out)
    t0 = time.time()

    from sdlora.models import BUNDLED

    base = "sdlora-tiny"
    if not (BUNDLED[base] / "model_index.json").exists():
        base = str(out / "tiny-sd")
        if not Path(base, "model_index.json").exists():
            subprocess.run([sys.executable, "-m", "sdlora.cli", "make-tiny", base], check=True)
        print(f"bundled model not found; using a random-weight tiny model at {base}")

    lora_dir = out / "lora"
    cmd = [sys.executable, str(ROOT / "train_text_to_image_lora.py"), "--pretrained_model_name_or_path", base,
           "--train_data_dir", str(ROOT / "examples/data/pokemon"), "--resolution", "32", "--center_crop",
           "--train_batch_size", "16", "--max_train_steps", str(a.steps), "--learning_rate", "1e-3",
           "--rank", "8", "--checkpointing_steps", "100", "--checkpoints_total_limit", "1", "--seed", "0",
           "--validation_prompt", PROMPTS[0], "--num_validation_images", "2", "--validation_epochs", "1000",
           "--output_dir", str(lora_dir)]
    print("$", " ".join(cmd[1:]))
    subprocess.run(cmd, check=True)

    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from sdlora.models import resolve_base

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = StableDiffusionPipeline.from_pretrained(resolve_base(base), safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe, PROMPTS)
    pipe.load_lora_weights(str(lora_dir))
    after = generate(pipe, PROMPTS)
    path = out / "before_after.png"
    grid([before, after]).save(path)
    print(f"\nLoRA:        {lora_dir / 'pytorch_lora_weights.safetensors'}")
    print(f"model card:  {lora_dir / 'README.md'}")
    print(f"before/after (top: base, bottom: base + LoRA; same prompts and seeds): {path}")
    print(f"total time:  {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
