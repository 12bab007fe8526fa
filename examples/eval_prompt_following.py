"""Measure prompt following of a (tiny) SD model with the deterministic detector in shapes.py.

    python examples/eval_prompt_following.py                       # bundled model, held-out pairs
    python examples/eval_prompt_following.py --split train --per-prompt 2 --grid /tmp/grid.png
    python examples/eval_prompt_following.py --model path/to/pipeline --lora path/to/lora

Prompts are "a {colour} {shape} on a {bg} background".  --split heldout (default) uses the
(shape colour, background) pairs in shapes.HELD_OUT_PAIRS, which the base model never saw, for
every shape; --split train uses as many pairs drawn from the training combinations.  Each prompt
is sampled --per-prompt times with fixed seeds.  Reported: the share of images whose background
colour, shape colour and shape the detector reads as prompted (and all three at once).
Sampling uses DPMSolverMultistepScheduler built from the pipeline's scheduler config, as
sdlora's generator does.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402


def load_pipeline(model: str = "sdlora-tiny", scheduler: str = "dpm"):
    """An unmodified diffusers pipeline for `model` ('sdlora-tiny' = the bundled model, or a
    folder / Hub id), sampling with DPMSolverMultistepScheduler (or DDIM), no progress bars."""
    from sdlora.logs import no_progress_bars, silence_noise

    silence_noise()  # before diffusers is imported: transformers' torchvision notice comes with the import
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    from sdlora.models import resolve_base

    with no_progress_bars():
        pipe = StableDiffusionPipeline.from_pretrained(resolve_base(model, flag="--model"), safety_checker=None,
                                                       requires_safety_checker=False)
    cls = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


@torch.no_grad()
def sample(pipe, prompts, seeds, steps: int = 20, guidance: float = 6.0, batch: int = 48):
    """Image i for prompts[i] from its own generator seeded seeds[i] (so it is the image a
    single-prompt call with that seed draws), `batch` images per pipeline call: about 5x faster
    than one call per image on CPU."""
    images = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        images += pipe(list(prompts[i:i + batch]), num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens).images
    return images


def grid(images, cols: int = 12, scale: int = 3):
    """sdlora's contact sheet, enlarged without smoothing so 32 px images stay readable."""
    from PIL import Image

    from sdlora.pipeline import grid as sheet

    g = sheet(images, cols)
    return g.resize((g.width * scale, g.height * scale), Image.NEAREST)


def evaluate(pipe, split="heldout", per_prompt=4, steps=20, guidance=6.0, seed=0, limit=None):
    specs = prompt_specs(split, per_prompt, seed)
    if limit:
        specs = specs[:limit]
    t = time.time()
    images = sample(pipe, [s["prompt"] for s in specs], [s["seed"] for s in specs], steps, guidance)
    res = shapes.prompt_following(images, specs)
    res |= {"split": split, "steps": steps, "guidance": guidance,
            "seconds": round(time.time() - t, 1)}
    return res, images, specs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sdlora-tiny", help="'sdlora-tiny' or a pipeline folder")
    p.add_argument("--lora", default=None, help="LoRA weights to load into the pipeline first")
    p.add_argument("--split", default="heldout", choices=["heldout", "train", "both"])
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt (24 prompts)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--scheduler", default="dpm", choices=["dpm", "ddim"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the images")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, args.scheduler)
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
        grid(all_images).save(args.grid)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
