#!/usr/bin/env python
"""DreamBooth evaluation: subject fidelity and class drift, with and without prior preservation.

For each seed and each setting, train_dreambooth_lora.py teaches the tiny base model the
example subject (examples/data/dreambooth: a cyan/magenta checker square, "a sks square"),
then, with the same sampling seeds as the base model:

  fidelity  share of "a sks square on a <colour> background" images that the subject detector
            (examples/shapes.py: subject_score) recognises;
  drift     how far images for plain class prompts ("a <colour> square on a <colour>
            background") move from the base model's: mean |pixel difference| / 255;
  leak      share of those class-prompt images that show the subject.

    python examples/eval_dreambooth.py                    # full table (a few minutes on CPU)
    python examples/eval_dreambooth.py --quick            # a smoke run on a tiny budget
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import shapes  # the example data's generator and detectors (beside this script)
from eval_prompt_following import load_base_pipeline
from sdlora import sample

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT / "examples/data/dreambooth"


def prompts():
    bgs = [c for c in shapes.COLOURS if c not in ("gray",)]
    subject = [f"{shapes.INSTANCE_PROMPT} on {shapes.with_article(b)} background" for b in bgs]
    cls = [shapes.caption("square", c, b) for c, b in zip(shapes.COLOURS, shapes.COLOURS[1:] + shapes.COLOURS[:1])]
    return subject, cls


def images(pipe, texts, seeds):
    """Every text with every seed, in one batch."""
    pairs = [(t, s) for t in texts for s in seeds]
    return sample(pipe, [t for t, _ in pairs], [s for _, s in pairs], guidance=5.0, batch=len(pairs))


def train(base, out, seed, prior, steps, class_dir, num_class):
    cmd = [sys.executable, str(ROOT / "train_dreambooth_lora.py"), "--pretrained_model_name_or_path", base,
           "--instance_data_dir", str(DATA / "instance"), "--instance_prompt", shapes.INSTANCE_PROMPT,
           "--class_prompt", shapes.CLASS_PROMPT, "--class_data_dir", str(class_dir),
           "--num_class_images", str(num_class), "--resolution", "32", "--train_batch_size", "4",
           "--learning_rate", "1e-3", "--rank", "8", "--max_train_steps", str(steps), "--seed", str(seed),
           "--checkpointing_steps", "100000", "--report_to", "none", "--output_dir", str(out)]
    if prior:
        cmd.append("--with_prior_preservation")
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="sdlora-tiny")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--num_class_images", type=int, default=48)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 steps, few prompts")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    if a.quick:
        a.seeds, a.steps, a.num_class_images = 1, 2, 4

    from sdlora.models import resolve_base

    base = resolve_base(a.base)
    pipe = load_base_pipeline(base)
    subject_prompts, class_prompts = prompts()
    if a.quick:
        subject_prompts, class_prompts = subject_prompts[:2], class_prompts[:2]
    eval_seeds = [100, 101]
    base_class = [np.asarray(im, np.float32) for im in images(pipe, class_prompts, eval_seeds)]
    base_subject = images(pipe, subject_prompts, eval_seeds)
    results = {"base": {"fidelity": float(np.mean([shapes.is_subject(im) for im in base_subject]))}}

    work = Path(tempfile.mkdtemp(prefix="eval-db-"))
    class_dir = work / "class-images"  # shared by every run: generated once
    for prior in (False, True):
        rows = []
        for seed in range(a.seeds):
            out = work / f"prior{int(prior)}-seed{seed}"
            train(base, out, seed, prior, a.steps, class_dir, a.num_class_images)
            pipe.load_lora_weights(str(out), adapter_name=out.name)
            subj = images(pipe, subject_prompts, eval_seeds)
            cls = images(pipe, class_prompts, eval_seeds)
            pipe.unload_lora_weights()
            rows.append({
                "fidelity": float(np.mean([shapes.is_subject(im) for im in subj])),
                "drift": float(np.mean([np.abs(np.asarray(im, np.float32) - b).mean() / 255
                                        for im, b in zip(cls, base_class)])),
                "leak": float(np.mean([shapes.is_subject(im) for im in cls])),
            })
        key = "with prior preservation" if prior else "without prior preservation"
        results[key] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} | {
            f"{k}_per_seed": [round(r[k], 3) for r in rows] for k in rows[0]}

    print(json.dumps(results, indent=2))
    print(f"\n{a.seeds} seed(s), {a.steps} steps, {len(subject_prompts)}x{len(eval_seeds)} subject and "
          f"{len(class_prompts)}x{len(eval_seeds)} class-prompt images per run\n")
    print("| setting | subject fidelity | class drift (mean abs pixel diff) | subject leak into class |")
    print("|---|---|---|---|")
    print(f"| base model | {results['base']['fidelity']:.0%} | 0 | - |")
    for key in ("without prior preservation", "with prior preservation"):
        r = results[key]
        print(f"| {key} | {r['fidelity']:.0%} | {r['drift']:.3f} | {r['leak']:.0%} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
