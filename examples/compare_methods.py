#!/usr/bin/env python
"""The LoRA family on one task: each --lora_type trained on the style set at a matched parameter budget, N seeds.

For every type (lora, dora, loha, lokr, adalora) the README quick start's recipe is run with the
type's rank chosen so its trainable parameters come closest to plain LoRA's at --rank (LoKr's count
barely moves with rank on these narrow layers: it is reported as it is). Each run is measured as the
quick start measures it: the share of held-out-prompt images in the new style, and the shape and
background colours those prompts ask for (examples/shapes.py detectors), plus trainable parameters,
file size, seconds per step (train phase only) and the trainer's peak RSS.

    python examples/compare_methods.py [--out compare] [--seeds 3] [--steps 1500] [--jobs 2]

--jobs 2 runs two trainings side by side, one torch thread each (one per core on a 2-core machine):
the s/step figures then include that sharing; --jobs 1 gives quiet-machine timings.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # quickstart.py is imported from beside this script (sys.path[0])

TYPES = ["lora", "dora", "loha", "lokr", "adalora"]
TARGETS = "attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0,attn2.to_q,attn2.to_out.0,conv1,conv2"  # the quick start's

# Runs the trainer in this child process and records when its phases start (the loop's on_phase hook) and its
# peak RSS.
WRAP = r"""
import atexit, json, resource, sys, time
from sdlora.recipes import text_to_image
out, marks = sys.argv.pop(1), {}
atexit.register(lambda: open(out, "w").write(json.dumps(
    {"marks": marks, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})))
sys.exit(text_to_image.main(sys.argv[1:], on_phase=lambda name: marks.setdefault(name, time.perf_counter())))
"""


def trainable(kind: str, rank: int, unet) -> int:
    """Trainable parameters of `kind` at `rank` on a copy of `unet` (AdaLoRA: at its starting rank, 1.5 x rank)."""
    import copy

    from sdlora.lora import adalora, inject

    unet, targets = copy.deepcopy(unet), TARGETS.split(",")
    if kind == "adalora":
        _, params = adalora.attach(unet, adalora.config(rank, rank, targets, 0.0, rank + max(1, rank // 2), 10, 1, 2, 1))
    else:
        params = inject.add_lora(unet, inject.lora_config(rank, rank, targets, dora=kind == "dora", kind=kind))
    return sum(p.numel() for p in params)


def matched_ranks(rank: int, base: str, kinds) -> dict[str, tuple[int, int]]:
    """{type: (rank, trainable params)} with each type's count closest to plain LoRA's at `rank`."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    budget = trainable("lora", rank, unet)
    out = {}
    for kind in kinds:
        counts = {r: trainable(kind, r, unet) for r in range(1, 2 * rank + 1)}
        best = min(counts, key=lambda r: (abs(counts[r] - budget), r))
        out[kind] = (best, counts[best])
    return out


def train_and_measure(kind: str, rank: int, seed: int, a, base: str) -> dict:
    import quickstart

    from sdlora.lora import formats

    out = Path(a.out) / f"{kind}-seed{seed}"
    stats = out / "trainer_stats.json"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", WRAP, str(stats), "--pretrained_model_name_or_path", base, "--train_data_dir", str(ROOT / "examples/data/pokemon"),
           "--resolution", "32", "--center_crop", "--train_batch_size", "8", "--max_train_steps", str(a.steps),
           "--learning_rate", a.lr, "--rank", str(rank), "--lora_type", kind, "--target_modules", TARGETS,
           "--lr_scheduler", "cosine", "--snr_gamma", "5", "--checkpointing_steps", str(a.steps + 1),
           "--seed", str(seed), "--report_to", "none", "--output_dir", str(out / "lora"),
           "--overwrite_output_dir"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out / "train.log", "w") as log:
        if subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"{kind} seed {seed} failed: see {out / 'train.log'}")
    s = json.loads(stats.read_text())
    weights = out / "lora" / formats.WEIGHTS_NAME
    pipe = quickstart.load_base_pipeline(base)
    from sdlora import Adapters

    Adapters(pipe).add([(str(out / "lora"), 1.0)])  # sdlora's loader: LoHa/LoKr too
    m = quickstart.measure(quickstart.generate(pipe, quickstart.PROMPTS, guidance=3.0, per_prompt=a.per_prompt))
    lora = formats.load_lora(weights)
    return {"type": kind, "rank": rank, "seed": seed, **m,
            "file_params": sum(x.parameters() for x in lora.modules.values()),
            "file_mb": weights.stat().st_size / 1e6,
            "s_per_step": (s["marks"]["saving"] - s["marks"]["training"]) / a.steps, "peak_rss_mb": s["peak_rss_mb"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="compare")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--rank", type=int, default=16, help="plain LoRA's rank; the others are matched to its parameters")
    p.add_argument("--lr", default="3e-3")
    p.add_argument("--per_prompt", type=int, default=4)
    p.add_argument("--jobs", type=int, default=1)
    a = p.parse_args()
    from sdlora.models import BUNDLED

    base = "sdlora-tiny"
    t0 = time.time()
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip() or "unknown"  # at the start: what the runs train with
    kinds = a.types.split(",")
    ranks = matched_ranks(a.rank, str(BUNDLED[base]), kinds)
    runs = [(k, ranks[k][0], seed) for seed in range(a.seeds) for k in kinds]
    # spawn, not fork: this process has run torch's thread pools, which a forked child inherits broken
    with concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(train_and_measure, *zip(*runs), [a] * len(runs), [base] * len(runs)))
    (Path(a.out) / "results.json").write_text(json.dumps(results, indent=2))

    def cell(rows, key, fmt):
        vals = [r[key] for r in rows]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(sd)}"

    print(f"\n{a.seeds} seeds x {a.steps} steps (batch 8, lr {a.lr}, cosine, quick-start targets), "
          f"{len(quickstart_prompts())} held-out prompts x {a.per_prompt} images; {cpu_name()}, "
          f"{os.cpu_count()} cores, --jobs {a.jobs}; sdlora commit {commit}; {time.time() - t0:.0f} s in all\n")
    print("| type | rank | trainable params | style | shape colour | background | file params | file MB "
          "| s/step | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in kinds:
        rows = [r for r in results if r["type"] == k]
        print(f"| {k} | {ranks[k][0]} | {ranks[k][1]:,} | {cell(rows, 'style', '{:.0%}')} | "
              f"{cell(rows, 'colour', '{:.0%}')} | {cell(rows, 'bg', '{:.0%}')} | {rows[0]['file_params']:,} | "
              f"{rows[0]['file_mb']:.2f} | {cell(rows, 's_per_step', '{:.3f}')} | {cell(rows, 'peak_rss_mb', '{:.0f}')} |")


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def quickstart_prompts():
    import quickstart

    return quickstart.PROMPTS


if __name__ == "__main__":
    main()
