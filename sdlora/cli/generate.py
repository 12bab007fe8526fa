"""`sdlora generate` and `sdlora fuse`: images from a base model with stacked LoRAs, or the LoRAs baked in."""
from __future__ import annotations

from ..errors import UserError
from ..pipeline import SCHEDULERS, check_sides, fuse_loras, generate, grid, load_pipeline, write_images
from .tools import SAVE_PRECISIONS


def register(sub):
    s = sub.add_parser("generate", help="generate images with a base model and stacked LoRAs")
    s.add_argument("prompt")
    s.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="LoRA folder, .safetensors file or Hub id, with an optional weight (repeatable)")
    s.add_argument("--base", help="base model (default: the first LoRA's base_model)")
    s.add_argument("--negative-prompt")
    s.add_argument("--seed", type=int, help="image i uses seed+i (default: random)")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=7.5)
    s.add_argument("--width", type=int, help="default: the base model's own size (e.g. 512 for SD 1.5, 1024 for SDXL)")
    s.add_argument("--height", type=int, help="default: the base model's own size")
    s.add_argument("--num-images", type=int, default=1)
    s.add_argument("--fuse", action="store_true", help="bake the LoRAs into the weights (faster sampling)")
    s.add_argument("--scheduler", default="dpm++", choices=[k for k in SCHEDULERS if k != "keep"])
    s.add_argument("--device")
    s.add_argument("--dtype", choices=list(SAVE_PRECISIONS))
    s.add_argument("--allow-pickle", action="store_true",
                   help="allow .bin/.pt/.ckpt LoRAs and .bin base weights (they can run code)")
    s.add_argument("--out", default="outputs", help="folder for the PNGs (default: outputs)")
    s.set_defaults(func=_generate_cli)

    s = sub.add_parser("fuse", help="write a full diffusers pipeline with LoRAs merged into its weights")
    s.add_argument("--base")
    s.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT]")
    s.add_argument("--dtype", choices=list(SAVE_PRECISIONS))
    s.add_argument("--allow-pickle", action="store_true",
                   help="allow .bin/.pt/.ckpt LoRAs and .bin base weights (they can run code)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_fuse_cli)


def _generate_cli(args):
    import secrets

    from ..io import save_image

    if args.num_images < 1 or args.steps < 1:
        raise UserError("--num-images and --steps must be at least 1")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    if args.base and (args.width or args.height):  # the sizes against the base's config files, before it loads
        from .. import basecheck, models

        base = models.resolve_base(args.base, flag="--base")
        basecheck.check(base)
        vae = models.base_configs(base)[2]
        if vae:  # unreadable (a Hub base): loading it reports why
            check_sides(args.width or None, args.height or None, vae)
    pipe = load_pipeline(args.lora, base=args.base, scheduler=args.scheduler, device=args.device,
                         dtype=args.dtype, allow_pickle=args.allow_pickle)
    if args.fuse and pipe.get_active_adapters():
        fuse_loras(pipe, unload=True)  # merged weights, no LoRA layers: base-model speed
    pipe.set_progress_bar_config(desc=f"generating {args.num_images} image(s)")
    images = generate(pipe, args.prompt, args.negative_prompt, seed, args.steps, args.guidance,
                      args.width, args.height, args.num_images)
    paths = write_images(pipe, images, args.out, args.prompt, args.negative_prompt, seed, args.steps, args.guidance,
                         args.scheduler, args.fuse)
    print("\n".join(map(str, paths)))
    if len(images) > 1:
        path = paths[0].with_name(paths[0].name.split("-")[0] + "-grid.png")
        save_image(grid(images), path)
        print(path)


def _fuse_cli(args):
    from ..io import atomic_dir

    pipe = load_pipeline(args.lora, base=args.base, scheduler="keep", device="cpu",
                         dtype=args.dtype or "fp32", allow_pickle=args.allow_pickle)
    fuse_loras(pipe, unload=True)
    with atomic_dir(args.out) as tmp:
        pipe.save_pretrained(str(tmp))
    print(f"wrote a fused pipeline ({', '.join(pipe.sdlora_adapters)} into {pipe.sdlora_base}) to {args.out}")
