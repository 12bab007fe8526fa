#!/usr/bin/env python
"""DreamBooth evaluation: the quick start's recipe over several training seeds, with and without prior
preservation, measured as examples/dreambooth_quickstart.py measures one run (subject fidelity, prompt
fidelity, class drift, subject leak; see its docstring), and printed as the README's table.

All runs share one folder of class images (the base model's "a square"), generated once.

    python examples/eval_dreambooth.py                          # the README table: 3 seeds x 2 settings
    python examples/eval_dreambooth.py --seeds 1 --steps 400    # one sweep point (any recipe flag)
    python examples/eval_dreambooth.py --quick                  # a smoke run on a tiny budget
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import dreambooth_quickstart as db
from eval_prompt_following import load_base_pipeline
from sdlora.logs import no_progress_bars

SETTINGS = {"without prior preservation": False, "with prior preservation": True}
METRICS = ("subject_fidelity", "prompt_fidelity", "class_drift", "subject_leak")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--settings", choices=["both", "prior", "no_prior"], default="both")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--per_prompt", type=int, default=6)
    # The recipe sweep sampled from seeds 100.. (the quick start's); the table draws from others, so the recipe was
    # not picked on the very images it is reported on.
    p.add_argument("--first_seed", type=int, default=1000, help="sampling seeds first_seed, first_seed + 1, ...")
    p.add_argument("--jobs", type=int, default=1, help="trainings side by side (one torch thread each)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 steps, 4 class images, 1 image per prompt")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--work", default=None, help="folder for the runs (default: a new temporary one)")
    db.recipe_args(p)
    a = p.parse_args()
    if a.quick:
        a.seeds, a.steps, a.num_class_images, a.per_prompt = 1, 2, 4, 1
    settings = {k: v for k, v in SETTINGS.items() if a.settings == "both" or v == (a.settings == "prior")}
    work = Path(a.work or tempfile.mkdtemp(prefix="eval-db-"))
    base = db.base_model(work)
    if any(settings.values()):  # the class images once, before runs that would race to write them
        warm = argparse.Namespace(**{**vars(a), "steps": 1})
        db.train(base, work / "class-warmup", warm, prior=True, class_dir=work / "class-images", quiet=True)

    t0 = time.time()
    runs = [(name, prior, seed) for name, prior in settings.items() for seed in range(a.seeds)]
    with ThreadPoolExecutor(a.jobs) as pool:
        dirs = list(pool.map(lambda r: db.train(base, work / f"prior{int(r[1])}-seed{r[2]}", a, r[2], r[1],
                                                work / "class-images", quiet=True), runs))
    t_train = (time.time() - t0) / len(runs) * a.jobs

    pipe = load_base_pipeline(base)
    base_imgs = db.draw_both(pipe, a.per_prompt, a.guidance, a.first_seed)
    results = {"base": db.measure(base_imgs[0], base_imgs[1], base_imgs[1])}
    # the drift scale: the base model's own class-prompt images from other seeds
    other = db.draw(pipe, db.CLASS_PROMPTS, a.per_prompt, a.guidance, first_seed=a.first_seed + 10_000)
    results["base"]["other_seeds_drift"] = db.measure(base_imgs[0], other, base_imgs[1])["class_drift"]
    per_run = {name: [] for name in settings}
    for (name, _, _), d in zip(runs, dirs):
        with no_progress_bars():
            pipe.load_lora_weights(str(d), adapter_name=d.name)
        imgs = db.draw_both(pipe, a.per_prompt, a.guidance, a.first_seed)
        pipe.unload_lora_weights()
        per_run[name].append(db.measure(imgs[0], imgs[1], base_imgs[1]))
    for name, rows in per_run.items():
        results[name] = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
        results[name] |= {f"{k}_per_seed": [round(r[k], 3) for r in rows] for k in METRICS}
    recipe = {k: getattr(a, k) for k in ("steps", "batch_size", "lr", "rank", "target_modules", "train_text_encoder",
                                         "prior_loss_weight", "num_class_images", "snr_gamma", "lr_scheduler",
                                         "mixed_precision")}
    results["settings"] = recipe | {"seeds": a.seeds, "guidance": a.guidance, "per_prompt": a.per_prompt,
                                    "first_seed": a.first_seed,
                                    "train_seconds_per_run": round(t_train, 1), "work": str(work)}
    print(json.dumps(results, indent=2))
    r = results["base"]
    print(f"\n{a.seeds} seed(s); per run {len(db.SUBJECT_PROMPTS) * a.per_prompt} subject-prompt images on backgrounds "
          f"the photos never showed and {len(db.CLASS_PROMPTS) * a.per_prompt} of the class prompt; ± half the seeds' range. "
          f"For scale, the base model's class-prompt images from other seeds differ by {r['other_seeds_drift']:.3f}.\n")
    print("| setting | subject fidelity | prompt fidelity | class drift | subject leak |")
    print("|---|---|---|---|---|")
    print(f"| base model | {r['subject_fidelity']:.0%} | {r['prompt_fidelity']:.0%} | 0 | {r['subject_leak']:.0%} |")
    for name in settings:
        r = results[name]
        spread = lambda k: np.ptp(r[f"{k}_per_seed"]) / 2  # noqa: E731 (half the seed range)
        print(f"| {name} | {r['subject_fidelity']:.0%} ± {spread('subject_fidelity'):.0%} | "
              f"{r['prompt_fidelity']:.0%} ± {spread('prompt_fidelity'):.0%} | {r['class_drift']:.3f} ± "
              f"{spread('class_drift'):.3f} | {r['subject_leak']:.0%} ± {spread('subject_leak'):.0%} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
