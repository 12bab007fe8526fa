"""Fixtures for tests, benchmarks and docs: a random LoRA written exactly as the trainer writes one."""
from __future__ import annotations

from pathlib import Path

from .lora import card, inject
from .lora.formats import WEIGHTS_NAME
from .models import architecture
from .output import weights


def demo_lora(out, base=None, unet=None, rank: int = 4, alpha: float | None = None, targets=inject.UNET_TARGETS,
              seed: int = 0, strength: float = 0.3, text_encoder=None, text_targets=None,
              text_encoder_2=None) -> Path:
    """A random LoRA in `out` (weights through the trainer's own writer, plus a model card naming `base`).

    Give `base` (a pipeline folder) or a `unet` module (left as it was: the adapter is removed again);
    `text_encoder` (and SDXL's `text_encoder_2`) add text-encoder parts. Returns the weights file."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft import LoraConfig, inject_adapter_in_model

    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
    parts = {"unet": (unet, list(targets))}
    for name, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            parts[name] = (model, list(text_targets or inject.TEXT_ENCODER_TARGETS))
    torch.manual_seed(seed)
    configured = {}
    for name, (model, tgts) in parts.items():
        if getattr(model, "peft_config", None):
            raise ValueError(f"demo_lora: the {name} already has LoRA adapters; give one without")
        cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=False, target_modules=tgts)
        inject_adapter_in_model(cfg, model)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # visible but bounded effect regardless of layer width
                p.data = torch.randn_like(p) * strength / p.shape[1] ** 0.5
        configured[name] = (model, cfg, None)
    info = {"base_model": str(base or "unknown"), "rank": rank, "alpha": alpha or rank, "steps": 0, "resolution": 32,
            "learning_rate": 0, "target_modules": list(targets), "kind": "demo",
            "architecture": architecture(dict(unet.config))}  # the header names the base's family
    file = Path(out) / WEIGHTS_NAME
    weights.save(file, configured, info)
    for model, _, _ in configured.values():  # leave the caller's models exactly as they were
        recurse_remove_peft_layers(model)
        del model.peft_config
    if base is not None:
        card.write_minimal(Path(out), str(base), "demo LoRA")
    return file


# A folder of the shapes phones and screens make: portrait 2:3 and 9:16, landscape 3:2 and 16:9, a square
# and one tiny image (w, h at scale 1; sizes are multiplied by `scale`).
PHOTO_SHAPES = {"portrait_2x3": (64, 96), "portrait_9x16": (72, 128), "landscape_3x2": (96, 64),
                "landscape_16x9": (128, 72), "square": (80, 80), "tiny": (20, 20)}


def photo_folder(folder, scale: int = 1, copies: int = 1) -> Path:
    """Images of mixed aspect ratios with .txt captions: a coloured disc centred on another colour, and a
    white stripe along each edge, so what a crop cuts off is visible."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(230, 30, 30), (30, 30, 230), (20, 160, 20), (230, 200, 0), (130, 0, 130), (0, 190, 190)]
    for c in range(copies):
        for i, (name, (w, h)) in enumerate(PHOTO_SHAPES.items()):
            w, h = (w, h) if name == "tiny" else (w * scale, h * scale)
            img = Image.new("RGB", (w, h), colours[(i + c) % 6])
            d = ImageDraw.Draw(img)
            d.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colours[(i + c + 1) % 6])
            d.rectangle((0, 0, w - 1, h - 1), outline=(255, 255, 255), width=max(1, min(w, h) // 16))
            stem = f"{name}_{c}" if copies > 1 else name
            img.save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(f"a {name.split('_')[0]} picture")
    return folder


def subject_on_noise(folder, masks_dir=None, n: int = 8, size: int = 32, alpha: bool = False, seed: int = 0):
    """A yellow disc (the subject, caption "a sks circle") on uniform noise, and its mask (a white disc) in
    `masks_dir` or as the image's alpha channel. Returns (folder, masks_dir)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if masks_dir:
        Path(masks_dir).mkdir(parents=True, exist_ok=True)
    box = (size * 3 // 16, size * 3 // 16, size * 13 // 16, size * 13 // 16)
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        m = Image.new("L", (size, size), 0)
        ImageDraw.Draw(img).ellipse(box, fill=(230, 200, 0))
        ImageDraw.Draw(m).ellipse(box, fill=255)
        if alpha:
            img.putalpha(m)
        img.save(folder / f"{i}.png")
        if masks_dir:
            m.save(Path(masks_dir) / f"{i}.png")
        (folder / f"{i}.txt").write_text("a sks circle")
    return folder, masks_dir


def disc_and_noise(lora=None, base: str = "sdlora-tiny", n: int = 8) -> tuple[list[float], float]:
    """For images of "a sks circle" (32 px, seeds 0..n-1) drawn with `lora`: the mean colour inside the disc,
    and the noise around it (mean absolute difference of neighbouring pixels outside radius 12)."""
    import numpy as np

    from .pipeline import load_pipeline, sample

    pipe = load_pipeline([lora] if lora else [], base=base, device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    a = np.stack([np.asarray(i, dtype=np.float32) for i in
                  sample(pipe, ["a sks circle"] * n, list(range(n)), steps=20, width=32, height=32)])
    yy, xx = np.mgrid[:32, :32]
    r = np.hypot(yy - 15.5, xx - 15.5)
    noise = float(np.abs(np.diff(a, axis=2))[:, (r > 12)[:, 1:]].mean())
    return [round(float(v), 1) for v in a[:, r < 7].mean(axis=(0, 1))], round(noise, 2)
