#!/usr/bin/env python
"""Latent caching at scale: the RAM cache against --cache_latents_to_disk, and the data loader without a cache.

  memory   what a cache of --images images holds at SD's 512 px latent size (8x64x64 fp32: mean | logvar of
           4 channels), as RSS growth (each cache built in a process of its own) and as the bytes of what the
           cache object keeps, per 10k images; a stand-in VAE returns random posteriors of that size, so
           thousands of images take seconds. Disk entries: write, read (warm, and cold: each file evicted from
           the page cache with posix_fadvise) and a reusing run's check (hash the image, read + verify the entry)
  encode   seconds per 512 px image through SD 1.5's VAE architecture (random weights), fp32 and bf16
  loader   decoded + augmented images/s of the training dataset (1024x768 JPEGs, random crop and flip into
           their 512 px bucket) with --dataloader_num_workers 0/1/2: the shortest step per image each can feed;
           with --sd15 DIR next to SD1.5's bare LoRA step at 512 px, batch 1 (benchmarks/train_step.py)

    python benchmarks/latent_cache.py                 # ~4 min on a 2-core CPU
    python benchmarks/latent_cache.py --sd15 DIR      # + ~2 min: DIR from `sdlora make-tiny DIR --arch sd15` (4 GB)
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sdlora.data.buckets import Bucketing  # noqa: E402
from sdlora.data.sources import Row  # noqa: E402
from sdlora.data.trainset import StreamSampler, TrainSet, loader  # noqa: E402
from sdlora.tiny import ARCHS  # noqa: E402
from sdlora.training.caches import Caches  # noqa: E402
from sdlora.training.diskcache import LatentStore, vae_id  # noqa: E402

LATENT = (8, 64, 64)  # SD's posterior at 512 px
PER = 10_000


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim():
    gc.collect()
    try:  # hand freed heap pages back, so RSS counts what is held, not what malloc kept
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def held(obj) -> int:
    """Bytes of the tensors, strings and containers an object keeps (not the folder a store points at)."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sys.getsizeof(obj) + sum(held(k) + held(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return sys.getsizeof(obj) + sum(held(v) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, Path):
        return held({k: v for k, v in vars(obj).items() if k != "store"})
    return sys.getsizeof(obj)


class StandInVAE:
    """An SD-sized posterior for any pixels."""

    def encode(self, px):
        return SimpleNamespace(latent_dist=SimpleNamespace(parameters=torch.randn(px.shape[0], *LATENT)))


def small_set(folder: Path, n: int):
    """n distinct 64 px PNGs standing in for 512 px images (the stand-in VAE never looks at them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, rows = np.random.default_rng(0), []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(Row(image=folder / f"{i}.png", caption="x", name=f"{i}.png", size=(512, 512)))
    return TrainSet(rows, [[i] for i in range(n)], [0] * n, 512, True, False)


class TimedStore(LatentStore):
    """A LatentStore that adds up the seconds its reads and writes take."""

    def __init__(self, root):
        super().__init__(root, "stand-in")
        self.seconds = {"read": 0.0, "write": 0.0}

    def read(self, key):
        t = time.perf_counter()
        try:
            return super().read(key)
        finally:
            self.seconds["read"] += time.perf_counter() - t

    def write(self, *a, **k):
        t = time.perf_counter()
        super().write(*a, **k)
        self.seconds["write"] += time.perf_counter() - t


def measure_memory(kind: str, n: int, batch: int) -> dict:
    """Child process: build one cache of n images; RSS growth, bytes held, and (disk) per-image times."""
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        return _memory(kind, n, batch, Path(tmp))


def _memory(kind: str, n: int, batch: int, tmp: Path) -> dict:
    warm = small_set(tmp / "warm", 8)
    data = small_set(tmp / "data", n)
    store = TimedStore(tmp / "cache") if kind == "disk" else None
    Caches().build_latents(warm, 0, StandInVAE(), "cpu", torch.float32, batch, False, store)  # imports, first writes
    trim()
    before = rss()
    caches = Caches()
    t0 = time.perf_counter()
    caches.build_latents(data, 0, StandInVAE(), "cpu", torch.float32, batch, False, store)
    build = time.perf_counter() - t0
    trim()
    out = {"rss_growth": rss() - before, "held": held(caches), "build_s": build / n}
    if store is None:
        return out
    files = sorted((tmp / "cache").glob("*/*.safetensors"))
    out.update(write_s=store.seconds["write"] / n, disk_bytes=sum(f.stat().st_size for f in files) / len(files))
    rows = list(caches.where)

    def read_all() -> float:
        t = time.perf_counter()
        for s in range(0, n, batch):
            caches.latent_batch(rows[s:s + batch])
        return (time.perf_counter() - t) / n
    out["read_warm_s"] = read_all()
    for f in files:  # evict only these files from the page cache (no global drop_caches)
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    out["read_cold_s"] = read_all()
    t = time.perf_counter()
    again = Caches()
    again.build_latents(data, 0, StandInVAE(), "cpu", torch.float32, batch, False, store)
    out["check_s"] = (time.perf_counter() - t) / n
    assert again.reused == n and again.encoded == 0
    return out


def measure_encode(images: int) -> dict:
    """Seconds per 512 px image through SD 1.5's VAE encoder (batch 1), fp32 and bf16; and vae_id's cost."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # vae.to(bf16)'s advice on from_pretrained does not apply here
    torch.manual_seed(0)
    vae = AutoencoderKL(**ARCHS["sd15"]["vae"]).eval().requires_grad_(False)
    out = {}
    t = time.perf_counter()
    vae_id(vae)
    out["vae_id_s"] = time.perf_counter() - t
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        vae = vae.to(dtype)
        times = []
        with torch.no_grad():
            for _ in range(images + 1):  # the first is a warm-up
                t = time.perf_counter()
                vae.encode(x.to(dtype)).latent_dist.parameters.float()
                times.append(time.perf_counter() - t)
        out[name] = statistics.median(times[1:])
    return out


def photos(folder: Path, n: int):
    """n photo-like 1024x768 JPEGs (smooth colour fields with grain), as a phone set resized for training."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, rows = np.random.default_rng(0), []
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((1024, 768), Image.BICUBIC)
        px = np.clip(np.asarray(low, dtype=np.int16) + rng.integers(-12, 13, (768, 1024, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(folder / f"{i}.jpg", quality=90)
        rows.append(Row(image=folder / f"{i}.jpg", caption="a photo", name=f"{i}.jpg", size=(1024, 768)))
    return TrainSet(rows, [[i] for i in range(n)], [0] * n, 512, False, True, Bucketing(512))


def measure_loader(n: int, workers: list[int]) -> dict:
    """Images/s out of the training DataLoader (batch 1), after its first batch (worker start-up) arrives."""
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as tmp:
        return _loader(photos(Path(tmp), n), n, workers)


def _loader(data: TrainSet, n: int, workers: list[int]) -> dict:
    out = {"bucket": data.buckets[0], "jpeg_kb": round(data.rows[0].image.stat().st_size / 1e3)}
    for w in workers:
        sampler = StreamSampler(len(data), 1, seed=0, keys=[data.key(i) for i in range(len(data))])
        it = iter(loader(data, 0, sampler, pixels=True, workers=w))
        t = time.perf_counter()
        next(it)
        start = time.perf_counter()
        for _ in range(n):
            batch = next(it)
        out[w] = {"images_per_s": n / (time.perf_counter() - start), "first_batch_s": start - t}
        assert batch["pixel_values"][0].shape[-2:] == tuple(reversed(data.buckets[0]))
        del it
    return out


def measure_step(model: str, precision: str, warmup: int) -> float:
    """SD1.5's bare LoRA step (UNet forward + backward + AdamW) at 512 px, batch 1, by benchmarks/train_step.py."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--only", "bare", "--model", model,
           "--arch", "sd15", "--resolution", "512", "--precision", precision, "--steps", "1", "--warmup", str(warmup)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
    if r.returncode:
        sys.exit(f"train_step.py failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["s_per_step"]


def child(kind: str, a) -> dict:
    cmd = [sys.executable, __file__, "--only", kind, "--images", str(a.images), "--batch", str(a.batch)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode:
        sys.exit(f"{kind} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="images per cache for the memory figures")
    p.add_argument("--batch", type=int, default=4, help="the cache's encode / read batch")
    p.add_argument("--encode_images", type=int, default=3, help="512 px images timed through SD 1.5's VAE")
    p.add_argument("--loader_images", type=int, default=48)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--sd15", default=None, metavar="DIR", help="an SD 1.5-architecture folder: measure s/step")
    p.add_argument("--step_precisions", default="bf16", help="with --sd15: no (fp32) and/or bf16, e.g. no,bf16")
    p.add_argument("--step_warmup", type=int, default=1, help="with --sd15: steps before the timed one")
    p.add_argument("--only", choices=["ram", "disk"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only:  # child process: one cache, its memory on its own
        print(json.dumps(measure_memory(a.only, a.images, a.batch)))
        return

    load0, t0 = os.getloadavg(), time.perf_counter()
    mem = {k: child(k, a) for k in ("ram", "disk")}
    enc = measure_encode(a.encode_images)
    feed = measure_loader(a.loader_images, [int(w) for w in a.workers.split(",")])
    step = {prec: measure_step(a.sd15, prec, a.step_warmup) for prec in a.step_precisions.split(",")} if a.sd15 else {}
    load1 = os.getloadavg()

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"machine: {cpu}, {os.cpu_count()} cores, {platform.system()}, {gpu}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"load average (1, 5, 15 min): {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at the start, "
          f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} at the end ({os.cpu_count()} cores: above that, other jobs "
          f"slowed these timings)")
    print(f"settings: {a.images} images per cache at 8x64x64 fp32 (SD, 512 px), encode/read batch {a.batch}; "
          f"SD 1.5 VAE encode at 512 px, batch 1, median of {a.encode_images}; loader: {a.loader_images} "
          f"{feed['jpeg_kb']} kB 1024x768 JPEGs into their {feed['bucket'][0]}x{feed['bucket'][1]} bucket, random "
          f"crop + flip, batch 1; total {time.perf_counter() - t0:.0f} s\n")
    scale, ram, disk = PER / a.images, mem["ram"], mem["disk"]
    mb = 1e6

    def per10k(s):
        s *= PER
        return f"{s:.0f} s" if s < 600 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"
    print(f"| per {PER:,} images at 512 px | RAM cache | `--cache_latents_to_disk` |")
    print("|---|---|---|")
    print(f"| RAM held (RSS growth, from {a.images}) | {ram['rss_growth'] * scale / mb:,.0f} MB | "
          f"{disk['rss_growth'] * scale / mb:,.1f} MB |")
    print(f"| RAM held (the cache object's bytes) | {ram['held'] * scale / mb:,.0f} MB | "
          f"{disk['held'] * scale / mb:,.1f} MB |")
    print(f"| disk | 0 | {disk['disk_bytes'] * PER / mb:,.0f} MB |")
    for name in ("fp32", "bf16"):
        print(f"| build: SD 1.5 VAE encode ({name}, {enc[name]:.2f} s/image) + write | "
              f"{per10k(enc[name])} | {per10k(enc[name] + disk['write_s'])} |")
    print(f"| write entries ({disk['write_s'] * 1e3:.2f} ms/image) | | {per10k(disk['write_s'])} |")
    print(f"| a later run's check: hash image + read and verify entry ({disk['check_s'] * 1e3:.2f} ms/image) | "
          f"encode again | {per10k(disk['check_s'])} |")
    print(f"| read per batch, warm page cache ({disk['read_warm_s'] * 1e3:.3f} ms/image) | 0 | "
          f"{per10k(disk['read_warm_s'])} |")
    print(f"| read per batch, cold ({disk['read_cold_s'] * 1e3:.3f} ms/image) | 0 | {per10k(disk['read_cold_s'])} |")
    print(f"\nvae_id (hash of the SD 1.5 VAE's fp32 weights, once per run): {enc['vae_id_s']:.2f} s\n")

    print("| `--dataloader_num_workers` | decoded + augmented images/s | feeds a step of at least (per image) | "
          "first batch after |")
    print("|---|---|---|---|")
    for w in [int(x) for x in a.workers.split(",")]:
        f = feed[w]
        print(f"| {w} | {f['images_per_s']:.1f} | {1e3 / f['images_per_s']:.0f} ms | {f['first_batch_s']:.2f} s |")
    for prec, sec in step.items():
        print(f"\nSD1.5 architecture, bare LoRA step (UNet forward + backward + AdamW), 512 px, batch 1, "
              f"{'fp32' if prec == 'no' else prec}: {sec:.1f} s (benchmarks/train_step.py, {a.step_warmup} warm-up "
              f"step{'s' * (a.step_warmup != 1)}): it needs {1 / sec:.3f} images/s")


if __name__ == "__main__":
    main()
