"""Measure prompt following of a (tiny) SD or SDXL model with the deterministic detector in shapes.py.

    python examples/eval_prompt_following.py                       # bundled model, held-out pairs
    python examples/eval_prompt_following.py --model sdlora-tiny-xl --split both  # the SDXL stand-in
    python examples/eval_prompt_following.py --split train --per-prompt 2 --grid /tmp/grid.png
    python examples/eval_prompt_following.py --model path/to/pipeline --lora path/to/lora

Prompts are "a {colour} {shape} on a {bg} background".  --split heldout (default) uses the
(shape colour, background) pairs in shapes.HELD_OUT_PAIRS, which the base model never saw, for
every shape; --split train uses as many pairs drawn from the training combinations.  Each prompt
is sampled --per-prompt times with fixed seeds.  Reported: the share of images whose background
colour, shape colour and shape the detector reads as prompted (and all three at once).
Sampling uses DPMSolverMultistepScheduler built from the pipeline's scheduler config, as
sdlora's generator does (sdlora.load_pipeline, sdlora.sample).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import shapes  # the example data's generator and detectors (beside this script)
from sdlora import grid, load_pipeline, sample


def load_base_pipeline(model: str = "sdlora-tiny"):
    """An unmodified diffusers pipeline for `model` ('sdlora-tiny' = the bundled model, 'sdlora-tiny-xl' = its SDXL
    counterpart, or a folder / Hub id) sampling with DPM-Solver, as sdlora's generator does, without progress bars:
    a StableDiffusionPipeline, or a StableDiffusionXLPipeline for an SDXL base."""
    pipe = load_pipeline(base=model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Progress:
    """`sample`'s on_batch over several calls: prints "evaluating: 24/192 images, ~2 min left" after each batch,
    so a long evaluation on CPU is not silent."""

    def __init__(self, total: int, what: str = "evaluating"):
        self.total, self.what, self.before, self.t0 = total, what, 0, time.time()

    def __call__(self, done: int, total: int):  # done of this call's total
        n, spent = self.before + done, time.time() - self.t0
        if done == total:
            self.before += total
        left = spent / n * (self.total - n)
        left = f"~{left / 60:.0f} min left" if left >= 90 else f"~{left:.0f} s left"
        print(f"{self.what}: {n}/{self.total} images, " + (left if n < self.total else f"{spent:.0f} s"), flush=True)


def prompt_specs(split: str = "heldout", per_prompt: int = 4, seed: int = 0) -> list[dict]:
    """One spec per image: shape, colour, bg, prompt, seed."""
    pairs = list(shapes.HELD_OUT_PAIRS)
    if split == "train":
        pairs = random.Random(seed).sample(shapes.train_pairs(), len(pairs))
    elif split != "heldout":
        raise ValueError(split)
    specs = []
    for colour, bg in pairs:
        for shape in shapes.SHAPES:
            for k in range(per_prompt):
                specs.append(dict(shape=shape, colour=colour, bg=bg,
                                  prompt=shapes.caption(shape, colour, bg), seed=seed + len(specs)))
    return specs


def evaluate(pipe, split="heldout", per_prompt=4, steps=20, guidance=6.0, seed=0, limit=None):
    specs = prompt_specs(split, per_prompt, seed)
    if limit:
        specs = specs[:limit]
    t = time.time()
    images = sample(pipe, [s["prompt"] for s in specs], [s["seed"] for s in specs], steps, guidance, batch=48)
    res = shapes.prompt_following(images, specs)
    res |= {"split": split, "steps": steps, "guidance": guidance,
            "seconds": round(time.time() - t, 1)}
    return res, images, specs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sdlora-tiny", help="'sdlora-tiny', 'sdlora-tiny-xl', 'sdlora-tiny-sd3' or a pipeline folder")
    p.add_argument("--lora", default=None, help="LoRA weights to load into the pipeline first")
    p.add_argument("--split", default="heldout", choices=["heldout", "train", "both"])
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt (24 prompts)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the images")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    pipe = load_base_pipeline(args.model)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    results, all_images = {}, []
    for split in (["heldout", "train"] if args.split == "both" else [args.split]):
        res, images, _ = evaluate(pipe, split, args.per_prompt, args.steps, args.guidance,
                                  args.seed, args.limit)
        results[split] = res
        all_images += images
        print(f"{split:8s} n={res['n']:4d}  background {res['bg']:6.1%}  shape colour "
              f"{res['colour']:6.1%}  shape {res['shape']:6.1%}  all three {res['all']:6.1%}  "
              f"({res['seconds']}s)", flush=True)
    if args.grid:
        grid(all_images, cols=12, scale=3).save(args.grid)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
