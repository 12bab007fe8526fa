"""Generation speed: base, base + 1 LoRA, base + 3 LoRAs (unfused), 3 LoRAs fused; and LoRA load time.

Runs offline on random-weight models of the real architectures:
    python benchmarks/generate.py --arch tiny
    python benchmarks/generate.py --arch sd15 --size 256 --steps 4
Prints one JSON object; images/s is the median over --runs timed runs after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_pipe(arch: str, tmp: Path, device: str):
    from sdlora.pipeline import assemble
    from sdlora.tiny import SCHEDULE, build_components, write_tokenizer

    unet, vae, text_encoder = build_components(arch)
    return assemble(unet, vae, text_encoder, write_tokenizer(tmp / "tok"), SCHEDULE).to(device)


def images_per_s(pipe, args, label: str) -> float:
    def one(seed, steps):
        g = torch.Generator("cpu").manual_seed(seed)
        pipe("a photo of a dog", num_inference_steps=steps, height=args.size, width=args.size, generator=g)

    one(0, 1)  # warm-up (one step is enough to allocate and pick kernels)
    times = []
    for i in range(args.runs):
        t = time.perf_counter()
        one(i + 1, args.steps)
        times.append(time.perf_counter() - t)
    ips = 1.0 / statistics.median(times)
    print(f"{label}: {ips:.4f} images/s (runs: {', '.join(f'{t:.2f}s' for t in times)})", file=sys.stderr, flush=True)
    return ips


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", choices=["tiny", "sd15"])
    p.add_argument("--size", type=int, help="image size in px (default: 32 tiny, 256 sd15)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.size = args.size or (32 if args.arch == "tiny" else 256)
    torch.set_num_threads(args.threads)

    from sdlora.pipeline import Adapters, fuse_loras
    from sdlora.testing import demo_lora

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t = time.perf_counter()
        pipe = build_pipe(args.arch, tmp, args.device)
        build_s = time.perf_counter() - t
        files = [demo_lora(tmp / f"lora{i}", unet=pipe.unet, rank=args.rank, seed=i) for i in range(3)]
        result = {"arch": args.arch, "size": args.size, "steps": args.steps, "runs": args.runs, "rank": args.rank,
                  "device": args.device, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                  "build_s": round(build_s, 2), "lora_file_bytes": files[0].stat().st_size}
        ips = {"base": images_per_s(pipe, args, "base")}
        t = time.perf_counter()
        adapters = Adapters(pipe)
        adapters.add([(files[0], 0.8)])
        result["lora_load_s"] = round(time.perf_counter() - t, 4)
        ips["1_lora_unfused"] = images_per_s(pipe, args, "1_lora_unfused")
        adapters.add([(f, 0.5) for f in files[1:]])
        ips["3_loras_unfused"] = images_per_s(pipe, args, "3_loras_unfused")
        t = time.perf_counter()
        fuse_loras(pipe, unload=True)  # what `generate --fuse` does: merged weights, no LoRA layers left
        result["fuse_s"] = round(time.perf_counter() - t, 4)
        ips["3_loras_fused"] = images_per_s(pipe, args, "3_loras_fused")
    result["images_per_s"] = {k: round(v, 4) for k, v in ips.items()}
    result["relative_to_base"] = {k: round(v / ips["base"], 3) for k, v in ips.items()}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
