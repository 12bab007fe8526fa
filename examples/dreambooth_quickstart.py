#!/usr/bin/env python
"""DreamBooth quick start: teach the bundled tiny model one subject from 8 photos, offline on CPU.

1. subject: examples/data/dreambooth/instance, 8 photos of one square with a cyan/magenta checker
   ("a sks square"), on 4 of the 8 background colours (shapes.SUBJECT_PHOTO_BGS).
2. train: train_dreambooth_lora.py on `sdlora-tiny` with prior preservation (class images of "a square"
   drawn by the base model first), exactly as a user would run it.
3. compare, base vs base + LoRA, same seeds (DPM-Solver, an unmodified diffusers pipeline):
   - the subject prompt in the 4 contexts the photos never showed ("a sks square on a blue background"),
   - the plain class prompt ("a square"), as many images,
   -> dreambooth_before_after.png, and the measurements (examples/shapes.py's pixel detectors):

   subject fidelity  share of subject-prompt images in which the detector finds the checker (every quadrant its colour)
   prompt fidelity   share of subject-prompt images whose background is the prompted colour
   class drift       how far class-prompt images move from the base model's, same seeds (mean |pixel diff| / 255;
                     for scale, the base model's own images of it from other seeds differ by ~0.32)
   subject leak      share of class-prompt images that show the subject

    python examples/dreambooth_quickstart.py [--out demo-dreambooth] [--no_prior] [recipe flags]
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import shapes  # the example data's generator and detectors (beside this script)
from eval_prompt_following import Progress, load_base_pipeline
from sdlora import grid, sample
from sdlora.logs import no_progress_bars
from sdlora.output.weights import kohya_name

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples/data/dreambooth"

CONTEXTS = shapes.SUBJECT_HELD_OUT_BGS  # backgrounds the photos never showed
SUBJECT_PROMPTS = [f"{shapes.INSTANCE_PROMPT} on {shapes.with_article(bg)} background" for bg in CONTEXTS]
CLASS_PROMPTS = [shapes.CLASS_PROMPT] * len(CONTEXTS)  # the plain class prompt, as many images (other seeds)


def recipe_args(p: argparse.ArgumentParser):
    """The training recipe; defaults are the sweep's pick (docs/tiny-model.md, "The DreamBooth LoRA")."""
    g = p.add_argument_group("recipe")
    g.add_argument("--steps", type=int, default=1200)
    g.add_argument("--batch_size", type=int, default=4, help="instance images per step (+ as many class images)")
    g.add_argument("--lr", default="1e-3")
    g.add_argument("--rank", default="8")
    # The subject is a texture (the checker): LoRA on the ResNet convolutions as well as attention.
    g.add_argument("--target_modules", default="to_q,to_k,to_v,to_out.0,conv1,conv2")
    # The text-encoder LoRA is what keeps the prompt's context words working after the identifier
    # (without it: prompt fidelity 4-8 %, docs/tiny-model.md).
    g.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--no_captions", action="store_true",
                   help="every photo with the bare instance prompt (diffusers' default) instead of its captioned context")
    g.add_argument("--prior_loss_weight", default="1.0")
    g.add_argument("--num_class_images", type=int, default=100)
    g.add_argument("--snr_gamma", default=None)
    g.add_argument("--lr_scheduler", default="constant")
    g.add_argument("--mixed_precision", choices=["no", "bf16"], default="no")


def train(base: str, out: Path, a, seed: int = 0, prior: bool = True, class_dir: Path | None = None,
          quiet: bool = False) -> Path:
    """Run train_dreambooth_lora.py as a user would; returns the LoRA folder."""
    cmd = [sys.executable, str(ROOT / "train_dreambooth_lora.py"), "--pretrained_model_name_or_path", base,
           "--instance_data_dir", str(DATA / "instance"), "--instance_prompt", shapes.INSTANCE_PROMPT,
           "--resolution", "32", "--train_batch_size", str(a.batch_size), "--max_train_steps", str(a.steps),
           "--learning_rate", a.lr, "--rank", a.rank, "--lr_scheduler", a.lr_scheduler, "--seed", str(seed),
           "--checkpointing_steps", "100000", "--report_to", "none", "--mixed_precision", a.mixed_precision,
           "--output_dir", str(out), "--overwrite_output_dir"]
    if a.target_modules:
        cmd += ["--target_modules", a.target_modules]
    if a.train_text_encoder:
        cmd += ["--train_text_encoder"]
    if not a.no_captions:
        cmd += ["--instance_captions"]
    if a.snr_gamma:
        cmd += ["--snr_gamma", a.snr_gamma]
    if prior:
        cmd += ["--with_prior_preservation", "--class_prompt", shapes.CLASS_PROMPT, "--prior_loss_weight",
                a.prior_loss_weight, "--num_class_images", str(a.num_class_images)]
        if class_dir:
            cmd += ["--class_data_dir", str(class_dir)]
    if not quiet:
        print("$ OMP_NUM_THREADS=1", shlex.join(["python", *map(os.path.relpath, cmd[1:2]), *cmd[2:]]))
    # One torch thread: this model's ops are too small to split (docs/tiny-model.md). OMP_NUM_THREADS, if set, wins.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run(cmd, env=env, capture_output=quiet, text=True)
    if r.returncode:
        sys.exit(r.stderr[-2000:] if quiet else 1)  # the trainer has said what was wrong
    return out


def draw(pipe, prompts, per_prompt: int, guidance: float, first_seed: int = 100, on_batch=None):
    """per_prompt images of each prompt, image i from seed first_seed + i: in the grid's order (prompts side by side)."""
    texts = [t for _ in range(per_prompt) for t in prompts]
    seeds = [first_seed + i for i in range(len(texts))]
    return sample(pipe, texts, seeds, 20, guidance, batch=len(prompts) * 2, on_batch=on_batch)


def draw_both(pipe, per_prompt: int, guidance: float, first_seed: int = 100, on_batch=None):
    """(subject-prompt images, class-prompt images), the same seeds for both."""
    return [draw(pipe, ps, per_prompt, guidance, first_seed, on_batch) for ps in (SUBJECT_PROMPTS, CLASS_PROMPTS)]


def measure(subject, cls, base_cls) -> dict:
    """The four DreamBooth measurements; image i of every list is drawn from the same prompt index and seed."""
    bgs = [CONTEXTS[i % len(CONTEXTS)] for i in range(len(subject))]
    return {
        "subject_fidelity": float(np.mean([shapes.is_subject(im) for im in subject])),
        "prompt_fidelity": float(np.mean([shapes.detect(im)["bg"] == bg for im, bg in zip(subject, bgs)])),
        "class_drift": float(np.mean([np.abs(np.asarray(im, np.float32) - np.asarray(b, np.float32)).mean() / 255
                                      for im, b in zip(cls, base_cls)])),  # same prompt, same seed
        "subject_leak": float(np.mean([shapes.is_subject(im) for im in cls])),
    }


def base_model(out: Path) -> str:
    from sdlora.models import BUNDLED

    if (BUNDLED["sdlora-tiny"] / "model_index.json").exists():
        return "sdlora-tiny"
    base = out / "tiny-sd"
    if not (base / "model_index.json").exists():
        subprocess.run([sys.executable, "-m", "sdlora.cli", "make-tiny", str(base)], check=True)
    print(f"bundled model not found; using a random-weight tiny model at {base}")
    return str(base)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-dreambooth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_prior", action="store_true", help="train without prior preservation")
    p.add_argument("--guidance", type=float, default=3.0, help="3: where the base model follows prompts best")
    p.add_argument("--per_prompt", type=int, default=6, help="seeds per prompt when measuring")
    recipe_args(p)
    a = p.parse_args()
    out = Path(a.out)
    t0 = time.time()
    base = base_model(out)
    lora_dir = train(base, out / "lora", a, a.seed, prior=not a.no_prior, class_dir=out / "class-images")
    t_train = time.time() - t0

    pipe = load_base_pipeline(base)
    progress = Progress(2 * len(SUBJECT_PROMPTS + CLASS_PROMPTS) * a.per_prompt, "evaluating (base, then base + LoRA)")
    before = draw_both(pipe, a.per_prompt, a.guidance, on_batch=progress)
    with no_progress_bars():  # transformers draws one for the text encoder's LoRA
        pipe.load_lora_weights(str(lora_dir))
    after = draw_both(pipe, a.per_prompt, a.guidance, on_batch=progress)
    b, m = measure(before[0], before[1], before[1]), measure(after[0], after[1], before[1])

    from PIL import Image

    photos = [Image.open(f).convert("RGB") for f in sorted((DATA / "instance").glob("*.png"))][:8]
    n = min(2 * len(CONTEXTS), len(before[0]))  # two seeds per context in the grid
    path = out / "dreambooth_before_after.png"
    grid(photos + before[0][:n] + after[0][:n] + before[1][:n] + after[1][:n], cols=n, scale=4).save(path)

    print(f"\nmeasured on {len(before[0])} subject-prompt images ({len(CONTEXTS)} backgrounds the photos never showed x "
          f"{a.per_prompt} seeds) and {len(before[1])} of '{shapes.CLASS_PROMPT}'; guidance {a.guidance:g}, same seeds, "
          f"base vs base + LoRA:")
    print(f"  subject fidelity (subject recognised):       {b['subject_fidelity']:5.0%} -> {m['subject_fidelity']:5.0%}")
    print(f"  prompt fidelity (prompted background kept):  {b['prompt_fidelity']:5.0%} -> {m['prompt_fidelity']:5.0%}")
    print(f"  class drift (class prompt, mean |diff|/255):   {0:5.3f} -> {m['class_drift']:5.3f}")
    print(f"  subject leak (subject in class prompt):      {b['subject_leak']:5.0%} -> {m['subject_leak']:5.0%}")
    print(f"\nLoRA:        {lora_dir / 'pytorch_lora_weights.safetensors'}  (diffusers)")
    print(f"             {lora_dir / kohya_name(lora_dir)}  (the same LoRA for ComfyUI / A1111 / Forge)")
    print(f"grid:        {path}  (rows: the photos; base, base + LoRA on '{SUBJECT_PROMPTS[0]}' ...; "
          f"base, base + LoRA on '{shapes.CLASS_PROMPT}')")
    print(f"total time:  {time.time() - t0:.0f} s (training {t_train:.0f} s)")


if __name__ == "__main__":
    main()
