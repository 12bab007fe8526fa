#!/usr/bin/env python
"""What each optimizer setting buys on the style quick start: steps to 70 % styled, the final figures, and the
step's cost on the SD1.5 architecture.

quality  examples/quickstart.py's run (the bundled tiny model, its pokemon-style data, batch 8, rank 16, cosine
         schedule, Min-SNR 5, 1500 steps) once per setting and seed, with the held-out prompts sampled every
         --every steps by the trainer itself (--sample_prompts: so EMA and schedule-free are sampled with the
         weights they save), one image per prompt, styled share from examples/shapes.py's detector; then the
         quick start's own measurement of the final LoRA (its 24 held-out prompts x 4 seeds: style, shape colour,
         background colour).
speed    s/step and peak RSS of the real trainer on the SD1.5 architecture (random weights, sdlora.tiny) at 256 px,
         batch 1, each setting in its own process (benchmarks/train_step.py's trainer run); wall seconds and the
         process's CPU seconds per step (the table's figure: it hardly moves when other work shares the cores).

    python benchmarks/optimizers.py quality --out bench-optim [--seeds 0 1 2] [--jobs 2] [--only Prodigy]
    python benchmarks/optimizers.py speed
    python benchmarks/optimizers.py table bench-optim     # the README's markdown table from the JSON files
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# (label, flags on top of the quick start's): each library's suggested starting point for a LoRA, one setting each.
SETTINGS = {
    "AdamW (quick start)": [],
    "Prodigy": ["--optimizer", "Prodigy", "--learning_rate", "1.0"],  # its authors' and diffusers' lr
    "AdamW schedule-free": ["--optimizer", "AdamWScheduleFree", "--lr_scheduler", "constant"],
    "AdamW + LoRA+ (ratio 16)": ["--loraplus_lr_ratio", "16"],  # LoRA+'s and kohya's suggested ratio
    "Lion": ["--optimizer", "Lion", "--learning_rate", "3e-4"],  # Lion's authors: 3-10x below AdamW's
    "Adafactor": ["--optimizer", "Adafactor"],  # kohya's default: relative step, its own step size
    "AdamW + EMA (decay 0.99)": ["--use_ema", "--ema_decay", "0.99"],
}
TARGET = 0.70


def quickstart_flags(out: Path, steps: int, seed: int, prompts: Path, every: int) -> list[str]:
    """examples/quickstart.py's training command (its defaults), sampling the held-out prompts every `every` steps."""
    return ["--pretrained_model_name_or_path", "sdlora-tiny", "--train_data_dir", str(ROOT / "examples/data/pokemon"),
            "--resolution", "32", "--center_crop", "--train_batch_size", "8", "--max_train_steps", str(steps),
            "--learning_rate", "3e-3", "--rank", "16", "--target_modules",
            "attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0,attn2.to_q,attn2.to_out.0,conv1,conv2",
            "--lr_scheduler", "cosine", "--snr_gamma", "5", "--checkpointing_steps", str(10 * steps), "--seed",
            str(seed), "--output_dir", str(out), "--overwrite_output_dir", "--sample_prompts", str(prompts),
            "--sample_every_n_steps", str(every), "--report_to", "none"]


def write_prompts(path: Path, guidance: float) -> Path:
    """The quick start's 24 held-out prompts with kohya's sampling options: its guidance, 20 steps, 32 px, seed i."""
    from quickstart import PROMPTS

    path.write_text("".join(f"{p} --l {guidance:g} --s 20 --w 32 --h 32 --d {i}\n" for i, p in enumerate(PROMPTS)))
    return path


def styled_by_step(samples: Path) -> dict[int, float]:
    """{step: share of that round's sample images the style detector calls styled}."""
    import shapes
    from PIL import Image

    rounds: dict[int, list[bool]] = {}
    for f in sorted(samples.glob("step*_*.png")):
        if f.stem.endswith("grid"):
            continue
        step = int(f.stem[4:].split("_")[0])
        rounds.setdefault(step, []).append(shapes.is_styled(Image.open(f).convert("RGB")))
    return {s: sum(v) / len(v) for s, v in sorted(rounds.items())}


def run_quality(label: str, seed: int, out: Path, steps: int, every: int, guidance: float) -> dict:
    """One setting, one seed: train (subprocess, one thread), then the quick start's measurement."""
    from eval_prompt_following import load_base_pipeline
    from quickstart import generate, measure, PROMPTS

    run_dir = out / f"{re.sub('[^a-z0-9]+', '-', label.lower()).strip('-')}-seed{seed}"
    prompts = write_prompts(Path(tempfile.mkdtemp(prefix="optim-prompts-")) / "prompts.txt", guidance)
    cmd = [sys.executable, str(ROOT / "train_text_to_image_lora.py"),
           *quickstart_flags(run_dir, steps, seed, prompts, every), *SETTINGS[label]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    train_s = time.time() - t0
    if proc.returncode:
        return {"label": label, "seed": seed, "error": proc.stderr[-2000:]}
    curve = styled_by_step(run_dir / "samples")
    pipe = load_base_pipeline("sdlora-tiny")
    pipe.load_lora_weights(str(run_dir))
    final = measure(generate(pipe, PROMPTS, guidance=guidance, per_prompt=4))
    reached = next((s for s, v in curve.items() if v >= TARGET), None)
    pace = [float(x.split("pace: ")[1].split(" s/step")[0]) for x in proc.stderr.splitlines() if "pace: " in x]
    res = {"label": label, "seed": seed, "flags": SETTINGS[label], "steps": steps, "every": every,
           "styled_by_step": curve, "steps_to_70": reached, "final": final, "train_wall_s": round(train_s, 1),
           "early_pace_s_per_step": pace[0] if pace else None}
    (out / f"{run_dir.name}.json").write_text(json.dumps(res, indent=1))
    return res


def quality(a) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # seed-major: a run cut short still has every setting on its first seeds
    jobs = [(label, seed) for seed in a.seeds for label in SETTINGS if not a.only or label in a.only]
    with concurrent.futures.ProcessPoolExecutor(a.jobs) as pool:
        futures = {pool.submit(run_quality, label, seed, out, a.steps, a.every, a.guidance): (label, seed)
                   for label, seed in jobs}
        for f in concurrent.futures.as_completed(futures):
            r = f.result()
            print(json.dumps({k: v for k, v in r.items() if k != "styled_by_step"}), flush=True)


def speed(a) -> None:
    """Each setting's trainer step on the SD1.5 architecture at 256 px, in its own process."""
    from sdlora.tiny import make_tiny

    model = a.model or str(make_tiny(Path(tempfile.mkdtemp(prefix="bench-sd15-")) / "model", arch="sd15"))
    rows = []
    for label, flags in SETTINGS.items():
        if a.only and label not in a.only:
            continue
        cmd = [sys.executable, __file__, "speed-child", "--model", model, "--steps", str(a.steps_measured),
               "--", *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
        if proc.returncode:
            sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
        rows.append({"label": label, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"cpu": cpu_name(), "threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}, indent=1))


def speed_child(a) -> None:
    import statistics

    import train_step  # benchmarks/train_step.py: the same trainer run its table measures

    from sdlora.training.hooks import Hooks
    from sdlora.training.loop import train

    b = argparse.Namespace(model=a.model, resolution=256, batch=1, warmup=2, steps=a.steps, precision="no", rank=4)
    config, recipe, _ = train_step.trainer_run(b, a.flags)
    times, cpu = [], []  # wall seconds per step, and the process's CPU seconds at each step's end
    train(config, recipe, Hooks(on_step=lambda step, logs: (times.append(logs["s_per_step"]),
                                                            cpu.append(time.process_time()))))
    cpu_steps = [b_ - a_ for a_, b_ in zip(cpu[b.warmup:], cpu[b.warmup + 1:])]
    # CPU seconds per step (all threads) hardly move when other work shares the cores; wall seconds do
    print(json.dumps({"s_per_step": round(statistics.median(times[b.warmup:]), 3),
                      "cpu_s_per_step": round(statistics.median(cpu_steps), 3) if cpu_steps else None,
                      "threads": torch_threads(),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def cpu_name() -> str:
    try:
        return next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                    if x.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def speed_rows(files: list[str]) -> dict[str, dict]:
    """{label: row} from `speed`'s JSON outputs; with several passes, each setting's fastest (the pass least slowed
    by other work on a shared machine)."""
    best: dict[str, dict] = {}
    for f in files:
        text = Path(f).read_text()
        for row in json.loads(text[text.index("{\n"):])["rows"]:  # the indented summary after the per-row lines
            key = "cpu_s_per_step" if row.get("cpu_s_per_step") else "s_per_step"
            row["s_per_step"] = row[key]
            if row["label"] not in best or row[key] < best[row["label"]]["s_per_step"]:
                best[row["label"]] = row
    return best


def table(a) -> None:
    """The markdown table from `quality`'s JSON files (and `speed`'s outputs, --speed FILE ...)."""
    import statistics

    runs = [json.loads(f.read_text()) for f in sorted(Path(a.out).glob("*.json"))]
    speed = speed_rows(a.speed or [])
    base = speed.get(next(iter(SETTINGS)), {}).get("s_per_step")
    print("| setting | steps to 70 % styled (seeds 0 / 1 / 2) | styled at the last round (24 images) | final: styled / "
          "shape colour / background (96 images) | CPU s/step, SD1.5 256 px | peak RSS |\n|---|---|---|---|---|---|")
    for label in SETTINGS:
        mine = sorted((r for r in runs if r["label"] == label and "final" in r), key=lambda r: r["seed"])
        if not mine:
            continue
        reach = " / ".join(f"{r['steps_to_70']:,}" if r["steps_to_70"] else f"> {r['steps']:,}" for r in mine)
        last = statistics.mean(list(r["styled_by_step"].values())[-1] for r in mine)
        f = {k: statistics.mean(r["final"][k] for r in mine) for k in ("style", "colour", "bg")}
        sp = speed.get(label, {})
        rel = f" ({sp['s_per_step'] / base:.2f}x)" if sp and base else ""
        print(f"| {label} | {reach} | {last:.0%} | {f['style']:.0%} / {f['colour']:.0%} / {f['bg']:.0%} "
              f"| {sp.get('s_per_step', '–')}{rel} | {sp.get('peak_rss_mb', '–')} MB |")
    print(f"\n{len(runs)} runs; means over the seeds listed; CPU: {cpu_name()}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--out", default="bench-optim")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--steps", type=int, default=1500, help="the quick start's")
    q.add_argument("--every", type=int, default=250, help="sample the held-out prompts every N steps")
    q.add_argument("--guidance", type=float, default=3.0, help="the quick start's")
    q.add_argument("--jobs", type=int, default=2)
    q.add_argument("--only", action="append", choices=list(SETTINGS))
    s = sub.add_parser("speed")
    s.add_argument("--model", help="an SD1.5-architecture folder (default: build one, random weights)")
    s.add_argument("--steps_measured", type=int, default=3)
    s.add_argument("--only", action="append", choices=list(SETTINGS))
    c = sub.add_parser("speed-child")
    c.add_argument("--model", required=True)
    c.add_argument("--steps", type=int, default=3)
    c.add_argument("flags", nargs=argparse.REMAINDER)
    t = sub.add_parser("table")
    t.add_argument("out")
    t.add_argument("--speed", nargs="*", help="speed's outputs (several passes: each setting's fastest)")
    a = p.parse_args()
    if getattr(a, "flags", None) and a.flags[0] == "--":
        a.flags = a.flags[1:]
    {"quality": quality, "speed": speed, "speed-child": speed_child, "table": table}[a.part](a)


if __name__ == "__main__":
    main()
