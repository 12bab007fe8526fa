"""`sdlora generate` and `sdlora fuse`: images from a base model with stacked LoRAs, or the LoRAs baked in."""
from __future__ import annotations

import argparse

from .. import sd3base
from ..errors import UserError
from ..models import BUNDLED_GUIDANCE, GUIDANCE, default_guidance
from ..pipeline import SCHEDULERS, fuse_loras, generate, grid, image_paths, load_adapters, write_images
from .tools import SAVE_PRECISIONS


def _flag(s, name: str, **kw):
    """--name in snake_case, the spelling every sdlora command documents; --name-with-dashes stays accepted, hidden
    from --help."""
    s.add_argument(f"--{name}", **kw)
    if "_" in name:
        alias = {k: v for k, v in kw.items() if k in ("action", "type", "choices", "nargs")}
        s.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                       **alias)


DTYPE_HELP = "the weights' precision (default: fp16 on a CUDA GPU, bf16 on a CPU that computes it natively, else fp32)"


def register(sub):
    s = sub.add_parser("generate", help="generate images with a base model and stacked LoRAs")
    s.add_argument("prompt", help="what to draw")
    s.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="LoRA folder, .safetensors file or Hub id, with an optional weight (repeatable)")
    s.add_argument("--base", help="base model: a diffusers folder, Hub id or single-file checkpoint (default: the "
                   "first LoRA's base_model)")
    _flag(s, "base_config", metavar="DIR_OR_ID", help="for a single-file --base: a diffusers folder or Hub id of its "
          "family, whose configs and tokenizers it loads with")
    _flag(s, "negative_prompt", help="what to steer away from")
    _flag(s, "clip_skip", type=int, metavar="N", help="use the N-th last text-encoder layer (kohya/A1111's clip skip; "
          "default: the one the first LoRA recorded, else 1, the last)")
    s.add_argument("--seed", type=int, help="image i uses seed+i (default: random)")
    s.add_argument("--steps", type=int, default=25, help="denoising steps (default: %(default)s)")
    bundled = ", ".join(f"{g:g} for {name}" for name, g in BUNDLED_GUIDANCE.items())
    s.add_argument("--guidance", type=float, help=f"classifier-free guidance; default: {bundled} (the guidance "
                   f"these bundled models were measured at), StableDiffusion3Pipeline's own "
                   f"default for SD3 bases, {GUIDANCE:g} for other bases")
    s.add_argument("--width", type=int, help="default: the base model's own size (e.g. 512 for SD 1.5, 1024 for "
                   "SDXL); a multiple of 8, at most 8x that size")
    s.add_argument("--height", type=int, help="default: the base model's own size")
    _flag(s, "num_images", type=int, default=1, help="images to draw, seeds --seed, --seed+1, … (default: 1)")
    s.add_argument("--fuse", action="store_true", help="bake the LoRAs into the weights (faster sampling)")
    s.add_argument("--scheduler", default="dpm++", choices=[k for k in SCHEDULERS if k != "keep"],
                   help="dpm++: DPMSolverMultistepScheduler (default); dpm++-karras: with Karras sigmas; an SD3 "
                   "base samples with its own FlowMatch scheduler under both, or dpm++-flow: DPM-Solver++ on its "
                   "flow sigmas")
    s.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: a CUDA GPU if there is one)")
    s.add_argument("--dtype", choices=list(SAVE_PRECISIONS), help=DTYPE_HELP)
    _flag(s, "allow_pickle", action="store_true",
          help="allow .bin/.pt/.ckpt LoRAs and .bin base weights (they can run code)")
    s.add_argument("--out", default="outputs", help="folder for the PNGs, numbered on from what it holds "
                   "(default: outputs)")
    s.set_defaults(func=_generate_cli)

    s = sub.add_parser("fuse", help="write a full diffusers pipeline with LoRAs merged into its weights")
    s.add_argument("--base", help="base model: a diffusers folder, Hub id or single-file checkpoint (default: the "
                   "first LoRA's base_model)")
    _flag(s, "base_config", metavar="DIR_OR_ID", help="for a single-file --base: a diffusers folder or Hub id of its "
          "family, whose configs and tokenizers it loads with")
    s.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT]",
                   help="LoRA folder, .safetensors file or Hub id, with an optional weight (repeatable)")
    s.add_argument("--dtype", choices=list(SAVE_PRECISIONS), help=DTYPE_HELP)
    _flag(s, "allow_pickle", action="store_true",
          help="allow .bin/.pt/.ckpt LoRAs and .bin base weights (they can run code)")
    s.add_argument("--out", required=True, help="the folder to write the fused pipeline to")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    s.set_defaults(func=_fuse_cli)


def _generate_cli(args):
    import secrets

    from ..io import save_image

    if args.num_images < 1 or args.steps < 1:
        raise UserError("--num_images and --steps must be at least 1")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    image_paths(args.out, seed, args.num_images)  # --out a file, or a name taken: said before anything loads
    adapters = load_adapters(args.lora, base=args.base, scheduler=args.scheduler, device=args.device,
                             dtype=args.dtype, allow_pickle=args.allow_pickle, width=args.width, height=args.height,
                             base_config=args.base_config)
    pipe = adapters.pipe
    if args.fuse and pipe.get_active_adapters():
        fuse_loras(pipe, unload=True)  # merged weights, no LoRA layers: base-model speed
    own = sd3base.own_guidance(pipe)  # SD3: the pipeline's default
    guidance = args.guidance if args.guidance is not None else default_guidance(adapters.base, own)
    pipe.set_progress_bar_config(desc=f"generating {args.num_images} image(s)")
    clip_skip = args.clip_skip if args.clip_skip is not None else adapters.clip_skip
    images = generate(pipe, args.prompt, args.negative_prompt, seed, args.steps, guidance,
                      args.width, args.height, args.num_images, clip_skip)
    _, grid_path = image_paths(args.out, seed, len(images))
    paths = write_images(adapters, images, args.out, args.prompt, args.negative_prompt, seed, args.steps, guidance,
                         args.scheduler, args.fuse)
    print("\n".join(map(str, paths)))
    if len(images) > 1:
        save_image(grid(images), grid_path)
        print(grid_path)


def _fuse_cli(args):
    from pathlib import Path

    from ..io import atomic_dir

    out = Path(args.out)
    if out.exists() and not (out.is_dir() and (args.overwrite or not any(out.iterdir()))):
        raise UserError(f"--out {out}: exists; choose another name" + (" or pass --overwrite" if out.is_dir() else ""))
    adapters = load_adapters(args.lora, base=args.base, scheduler="keep", device="cpu",
                             dtype=args.dtype or "fp32", allow_pickle=args.allow_pickle, base_config=args.base_config)
    fuse_loras(adapters.pipe, unload=True)
    with atomic_dir(args.out) as tmp:
        adapters.pipe.save_pretrained(str(tmp))
    print(f"wrote a fused pipeline ({', '.join(adapters.loaded)} into {adapters.base}) to {args.out}")
