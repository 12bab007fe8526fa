"""What each PNG records: the parameters an image was drawn with, as sdlora's own JSON and the 'parameters' text
A1111/ComfyUI read, and the numbered names `sdlora generate` writes."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from .images import denoiser

# A1111's names for the samplers sdlora draws with (the PNG 'parameters' text, which A1111, Forge and Civitai parse);
# the JSON records sdlora's own name (a --scheduler value, or flow-match-euler: an SD3 base's own FlowMatch Euler).
A1111_SAMPLERS = {"dpm++": "DPM++ 2M", "dpm++-karras": "DPM++ 2M Karras", "dpm++-flow": "DPM++ 2M",
                  "flow-match-euler": "Euler"}


def scheduler_name(pipe, asked: str) -> str:
    """What `pipe` samples with, by sdlora's name: `asked` (the --scheduler given), except where an SD3 base keeps its
    own FlowMatch Euler scheduler under dpm++ / dpm++-karras (pipeline.set_scheduler)."""
    return "flow-match-euler" if "FlowMatch" in type(pipe.scheduler).__name__ else asked


def write_images(adapters, images, out, prompt: str, negative_prompt, seed: int, steps: int, guidance: float,
                 scheduler: str, fused: bool = False, loras: list | None = None) -> list[Path]:
    """Save `generate`'s images (image i drawn with seed+i) as out/NNNNN-SEED.png, numbered on from what `out`
    holds, each carrying its parameters: the base and `loras` of `adapters` (an `Adapters`; `loras` default: its
    stack) as recorded."""
    from .. import models
    from ..io import save_image

    paths, _ = image_paths(out, seed, len(images))
    Path(out).mkdir(parents=True, exist_ok=True)
    if loras is None:
        loras = adapters.records()
    precision = models.precision_name(denoiser(adapters.pipe).dtype)
    scheduler = scheduler_name(adapters.pipe, scheduler)
    for i, (path, im) in enumerate(zip(paths, images)):
        params = image_params(prompt, negative_prompt, seed + i, steps, guidance, im, scheduler, adapters.base,
                              loras, fused, precision=precision)
        save_image(im, path, pnginfo=png_info(params))
    return paths


def image_paths(out, seed: int, n: int) -> tuple[list[Path], Path]:
    """The names `write_images` gives n images drawn from `seed` in `out`, out/NNNNN-SEED.png numbered on from what
    it holds, and their grid's (out/NNNNN-grid.png); a one-line error, before anything is drawn, where `out` is
    not a folder or a name is taken."""
    out = Path(out)
    folder = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    if not folder.is_dir():
        raise UserError(f"--out {out}: {folder} exists and is a file, not a folder; choose another name")
    nums = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
    start = max(nums, default=-1) + 1
    paths, grid_path = [out / f"{start + i:05d}-{seed + i}.png" for i in range(n)], out / f"{start:05d}-grid.png"
    for path in paths + [grid_path] * (n > 1):
        if path.exists() or path.is_symlink():  # numbering on makes this a race with another writer
            raise UserError(f"{path} exists; choose another --out folder")
    return paths, grid_path


def image_params(prompt: str, negative_prompt, seed: int, steps: int, guidance: float, image, scheduler: str,
                 base: str, loras: list, fused: bool = False, **extra) -> dict:
    """The parameters an image was drawn with, as `sdlora generate` and training samples record them."""
    from ..version import __version__

    return {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps, "guidance": guidance,
            "width": image.width, "height": image.height, "scheduler": scheduler, "base": base, "loras": loras,
            "fused": fused, "sdlora_version": __version__, **extra}


def png_info(params: dict):
    """PNG text chunks: sdlora's own JSON, and the 'parameters' text A1111/ComfyUI users know."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("sdlora", json.dumps(params))
    info.add_text("parameters", a1111_text(params))
    return info


def a1111_text(p: dict) -> str:
    """The 'parameters' text A1111/ComfyUI users know, so the PNG reads well in their tools."""
    loras = "".join(f" <lora:{lo['name']}:{lo['weight']:g}>" for lo in p["loras"])
    lines = [p["prompt"] + loras]
    if p["negative_prompt"]:
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    sampler = A1111_SAMPLERS.get(p["scheduler"], p["scheduler"])
    lines.append(f"Steps: {p['steps']}, Sampler: {sampler}, CFG scale: {p['guidance']:g}, Seed: {p['seed']}, "
                 f"Size: {p['width']}x{p['height']}, Model: {p['base']}")
    return "\n".join(lines)
