#!/usr/bin/env python
"""Seconds per training step and peak memory of the real trainer, next to two references.

  forward  one plain UNet forward (no grad) at the training shape
  bare     one bare LoRA step: UNet forward + backward + AdamW on ready latents/embeddings
  trainer  sdlora's training loop (data, caches, VAE/text encoder, logging included)

Each runs in its own process so peak memory (RSS on CPU, torch.cuda.max_memory_allocated on
GPU) is its own. Times are the median of --steps after --warmup. Prints JSON.

    python benchmarks/train_step.py --arch sd15 --resolution 256 --batch 1
    python benchmarks/train_step.py --arch sdxl --resolution 256 --precision bf16   # ~8 GB RAM, 15 GB disk
    python benchmarks/train_step.py --arch sd35-medium --precision bf16 --steps 2 --warmup 1   # ~12 GB RAM, 16 GB disk

The SD3.5 architectures (tiny_sd3.SD3_ARCHS) are written here in bf16 one component at a time (`make_sd3_bf16`),
so the build never holds more than the largest part (T5-XXL: 9.5 GB) in memory.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_sd3_bf16(out: Path, arch: str) -> Path:
    """`sdlora make-tiny --arch ARCH` for a real SD3.5 architecture, in bf16 and one part at a time: the tiny SD3
    folder (model_index, tokenizers, schedule), then each part rebuilt at `arch`'s size and saved over it."""
    import gc
    import shutil

    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sdlora.tiny import text_config
    from sdlora.tiny_sd3 import SD3_ARCHS, make_sd3, t5_vocab

    make_sd3(out, arch="sd3")
    cfg = SD3_ARCHS[arch]
    parts = {"transformer": lambda: SD3Transformer2DModel(**cfg["transformer"]),
             "vae": lambda: AutoencoderKL(**cfg["vae"]),
             "text_encoder": lambda: CLIPTextModelWithProjection(text_config(**cfg["text"])),
             "text_encoder_2": lambda: CLIPTextModelWithProjection(text_config(**cfg["text_2"])),
             "text_encoder_3": lambda: T5EncoderModel(T5Config(vocab_size=len(t5_vocab()), pad_token_id=0,
                                                               eos_token_id=1, decoder_start_token_id=0, **cfg["t5"]))}
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    for name, make in parts.items():
        torch.set_default_dtype(torch.bfloat16)
        try:
            part = make()
        finally:
            torch.set_default_dtype(default)
        shutil.rmtree(out / name)
        part.save_pretrained(str(out / name), max_shard_size="2GB")
        del part
        gc.collect()
    return out


def _peak_mb(device) -> float:
    """This process's peak: CUDA's allocated peak, or on the CPU the kernel's high-water mark of this process's own
    memory (VmHWM). Not ru_maxrss: Linux carries the parent's peak into a child across fork + exec, so every child
    of a parent that built a 16 GB model would report 16 GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        return int(re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; macOS: bytes (a rough figure)


def _unet_inputs(unet, a, device):
    """Latents, timesteps, text embeddings and (SDXL) the added conditioning at the training shape."""
    from diffusers import AutoencoderKL

    from sdlora import models

    vae = AutoencoderKL.load_config(a.model, subfolder="vae")
    lat = a.resolution // models.vae_factor(vae)
    latents = torch.randn(a.batch, 4, lat, lat, device=device)
    t = torch.randint(0, 1000, (a.batch,), device=device)
    emb = torch.randn(a.batch, 77, unet.config.cross_attention_dim, device=device)
    extra = {}
    if unet.config.addition_embed_type == "text_time":  # pooled text + 6 size/crop ids, as the trainer passes
        c = unet.config
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        ids = torch.tensor([[a.resolution, a.resolution, 0, 0, a.resolution, a.resolution]] * a.batch, device=device)
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(a.batch, pooled, device=device), "time_ids": ids}}
    return latents, t, emb, extra


def _sd3_inputs(model, a, device):
    """SD3: latents (the VAE's channels), timesteps, the joint prompt embeddings (77 CLIP + max_sequence_length T5
    tokens, sd3cond) and the pooled projections, as keyword arguments of the MMDiT after the latents."""
    from diffusers import AutoencoderKL

    from sdlora import models
    from sdlora.training.config import default_of

    c = model.config
    lat = a.resolution // models.vae_factor(AutoencoderKL.load_config(a.model, subfolder="vae"))
    latents = torch.randn(a.batch, c.in_channels, lat, lat, device=device)
    t = torch.rand(a.batch, device=device) * 1000
    emb = torch.randn(a.batch, 77 + default_of("max_sequence_length"), c.joint_attention_dim, device=device)
    return latents, t, emb, {"pooled_projections": torch.randn(a.batch, c.pooled_projection_dim, device=device)}


def _reference_model(a, device, dtype):
    """(model, targets, call(model, latents, t, emb, extra) -> prediction) of the UNet or (SD3) the MMDiT."""
    from sdlora import models, sd3base, sd3models
    from sdlora.lora import inject as lora

    if models.family(a.model) == "sd3":
        model = sd3models.load_transformer(a.model, dtype=dtype).to(device)
        return model, list(sd3base.TRANSFORMER_TARGETS), _sd3_inputs(model, a, device), \
            lambda m, x, t, emb, extra: m(hidden_states=x, timestep=t, encoder_hidden_states=emb, **extra).sample
    model = models.load_unet(a.model, dtype=dtype).to(device)
    return model, lora.UNET_TARGETS, _unet_inputs(model, a, device), \
        lambda m, x, t, emb, extra: m(x, t, emb, **extra).sample


def measure_reference(a, kind: str) -> dict:
    from sdlora import models
    from sdlora.lora import inject as lora

    device = torch.device(a.device)
    dtype = models.torch_dtype(a.precision)
    unet, targets, (latents, t, emb, extra), run = _reference_model(a, device, dtype)
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = torch.compile(unet) if a.compile else unet
    extra = torch.utils._pytree.tree_map_only(torch.Tensor, lambda v: v.to(dtype) if v.is_floating_point() else v,
                                              extra)
    call = lambda x, t, emb, **extra: run(model, x, t, emb, extra)  # noqa: E731
    autocast = torch.autocast(device.type, dtype=dtype, enabled=a.precision != "no")
    if kind == "forward":
        unet.requires_grad_(False)

        def step():
            with torch.no_grad(), autocast:
                call(latents.to(dtype), t, emb.to(dtype), **extra)
    else:
        params = lora.add_lora(unet, lora.lora_config(a.rank, None, targets))
        for p in params:
            p.data = p.data.float()
        opt = torch.optim.AdamW(params, lr=1e-4)
        target = torch.randn_like(latents)

        def step():
            with autocast:
                pred = call(latents.to(dtype), t, emb.to(dtype), **extra)
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    times = []
    for _ in range(a.warmup + a.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"s_per_step": statistics.median(times[a.warmup:]), "peak_mb": _peak_mb(device)}


class Phases(logging.Handler):
    """Peak RSS and seconds of each phase of a training run, from the loop's `phase: …` debug lines. The peak is
    the kernel's high-water mark (VmHWM), reset at each phase's start through /proc/self/clear_refs (Linux)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.current, self.t0, self.result = "start", time.perf_counter(), {}

    def emit(self, record):
        msg = record.getMessage()
        if not msg.startswith("phase: "):
            return
        status = Path("/proc/self/status").read_text()
        peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
        now = time.perf_counter()
        self.result[self.current] = {"peak_rss_mb": round(peak), "seconds": round(now - self.t0, 2)}
        Path("/proc/self/clear_refs").write_text("5")
        self.current, self.t0 = msg[len("phase: "):], now


def trainer_run(a, extra: list[str]):
    """(args, TrainConfig, recipe) of a benchmark run of the real trainer: 8 random images at --resolution in a fresh
    temporary folder, the benchmark's batch / steps / precision / rank, plus `extra` flags; with a `Phases` handler
    on sdlora's log, which it returns too."""
    from sdlora.recipes import text_to_image as t2i
    from PIL import Image

    from sdlora.cli.flags import train_config

    data = Path(tempfile.mkdtemp(prefix="bench-data-"))
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        px = (torch.rand(a.resolution, a.resolution, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a photo of thing number {i}")
    argv = ["--pretrained_model_name_or_path", a.model, "--train_data_dir", str(data), "--output_dir",
            tempfile.mkdtemp(prefix="bench-out-"), "--resolution", str(a.resolution), "--train_batch_size",
            str(a.batch), "--max_train_steps", str(a.warmup + a.steps), "--report_to", "none", "--seed", "0",
            "--checkpointing_steps", "1000000", "--mixed_precision", a.precision, "--rank", str(a.rank), *extra]
    args = t2i.parse_args(argv)
    config = train_config(args)
    phases = Phases()
    sdlora_log = logging.getLogger("sdlora")
    sdlora_log.addHandler(phases)
    sdlora_log.setLevel(logging.DEBUG)
    return config, t2i.make_recipe(args, config), phases


def measure_trainer(a) -> dict:
    from sdlora.training.hooks import Hooks
    from sdlora.training.loop import train

    config, recipe, phases = trainer_run(a, ["--gradient_checkpointing"] * a.gradient_checkpointing +
                                         ["--no_cache"] * a.no_cache + ["--compile"] * a.compile)
    times = []
    train(config, recipe, Hooks(on_step=lambda step, logs: times.append(logs["s_per_step"])))
    on_cpu = torch.device(a.device).type == "cpu"
    # on the CPU VmHWM restarts at each phase (Phases), so the run's peak is the largest phase's
    peak = max([_peak_mb(torch.device(a.device))] + [v["peak_rss_mb"] for v in phases.result.values()] * on_cpu)
    phases.result.pop("start", None)
    phases.result.pop("done", None)
    return {"s_per_step": statistics.median(times[a.warmup:]), "peak_mb": peak,
            "first_step_s": times[0], **({"phases": phases.result} if on_cpu else {})}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny",
                   choices=["tiny", "sd15", "sdxl-tiny", "sdxl", "sd3", "sd35-medium", "sd35-large"],
                   help="sd3: the tiny SD3; sd35-*: the real SD3.5 architectures, written in bf16 (make_sd3_bf16)")
    p.add_argument("--model", default=None, help="an existing pipeline folder instead of building --arch")
    p.add_argument("--resolution", type=int, default=None, help="default: 32 for tiny, 64 for sdxl-tiny, 256 else")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--no_cache", action="store_true")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (bare step and trainer)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--kinds", default="forward,bare,trainer",
                   help="which measurements, comma-separated (trainer alone: the SD3.5 Large rows, ~3x faster)")
    p.add_argument("--only", choices=["forward", "bare", "trainer"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    a.resolution = a.resolution or {"tiny": 32, "sdxl-tiny": 64, "sd3": 64}.get(a.arch, 256)
    a.device = "cuda" if torch.cuda.is_available() else "cpu"

    if a.only:  # child process: one measurement
        res = measure_trainer(a) if a.only == "trainer" else measure_reference(a, a.only)
        print(json.dumps(res))
        return

    if a.model is None:
        from sdlora.tiny import make_tiny
        from sdlora.tiny_sd3 import make_sd3

        out = Path(tempfile.mkdtemp(prefix=f"bench-{a.arch}-")) / "model"
        a.model = str(make_sd3_bf16(out, a.arch) if a.arch.startswith("sd35") else make_sd3(out) if a.arch == "sd3"
                      else make_tiny(out, arch=a.arch))
    results = {}
    kinds = a.kinds.split(",")
    for kind in kinds:
        cmd = [sys.executable, __file__, "--only", kind, "--model", a.model] + [
            x for k, v in vars(a).items() if k not in ("only", "model", "device", "arch", "kinds") and v is not None
            for x in ([f"--{k}"] if v is True else [] if v is False else [f"--{k}", str(v)])]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
        if out.returncode:
            sys.exit(f"{kind} failed:\n{out.stderr[-3000:]}")
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    nan = {"s_per_step": float("nan"), "peak_mb": float("nan"), "first_step_s": float("nan")}
    fwd, bare, tr = (results.get(k, nan) for k in ("forward", "bare", "trainer"))
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
                   + (f", {torch.cuda.get_device_name()}" if a.device == "cuda" else ", CPU only"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "arch": a.arch, "resolution": a.resolution, "batch": a.batch,
        "precision": a.precision, "rank": a.rank, "cache": not a.no_cache,
        "gradient_checkpointing": a.gradient_checkpointing, "compile": a.compile, "steps_measured": a.steps,
        "unet_forward_s": round(fwd["s_per_step"], 4), "bare_lora_step_s": round(bare["s_per_step"], 4),
        "trainer_step_s": round(tr["s_per_step"], 4),
        "trainer_vs_bare": round(tr["s_per_step"] / bare["s_per_step"], 3),
        "bare_vs_forward": round(bare["s_per_step"] / fwd["s_per_step"], 3),
        "peak_mb": {k: round(v["peak_mb"]) for k, v in results.items()},
        "trainer_peak_vs_bare": round(tr["peak_mb"] / bare["peak_mb"], 3),
        "trainer_first_step_s": round(tr["first_step_s"], 2),  # includes torch.compile's compile time
        "trainer_phases": tr.get("phases"),  # CPU: peak RSS and seconds of load / cache / load UNet / train / save
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
