"""`sdlora inspect | convert | resize | merge | extract | make-tiny`: the LoRA file tools on the command line (the
work and its report: sdlora/toolkit.py)."""
from __future__ import annotations

from .. import toolkit
from ..errors import UserError
from ..lora import formats

SAVE_PRECISIONS = ("fp32", "fp16", "bf16")


def _inspect_cli(args):
    print(toolkit.inspect_file(args.file, args.allow_pickle, as_json=args.json))


def _convert_cli(args):
    print(toolkit.convert_file(args.input, args.out, args.to, args.dtype, args.overwrite, args.allow_pickle))


def _resize_cli(args):
    print(toolkit.resize_file(args.input, args.out, args.rank, args.to, args.dtype, args.overwrite, args.allow_pickle))


def _merge_cli(args):
    *specs, out = args.items
    print(toolkit.merge_files(specs, out, args.rank, args.to, args.dtype, args.overwrite, args.allow_pickle))


def _extract_cli(args):
    print(toolkit.extract_file(args.base, args.tuned, args.rank, args.out, args.to, args.dtype,
                               text_encoder=not args.unet_only, overwrite=args.overwrite,
                               allow_pickle=args.allow_pickle, base_config=args.base_config))


def _make_tiny_cli(args):
    from ..tiny import is_xl, make_tiny
    from ..tiny_sd3 import SD3_ARCHS, make_sd3

    if args.single_file:
        import tempfile

        from ..bases import ldm

        if args.arch in SD3_ARCHS:
            raise UserError(f"--arch {args.arch} --single-file: single files are written for SD 1.x/2.x/XL only")
        with tempfile.TemporaryDirectory() as tmp:
            out, family = ldm.write(make_tiny(tmp, arch=args.arch, seed=args.seed), args.dir)
        print(f"wrote a {args.arch}-architecture single-file checkpoint (original layout, random weights) to {out}")
        return
    if args.arch in SD3_ARCHS:
        out, kind = make_sd3(args.dir, arch=args.arch, seed=args.seed), "StableDiffusion3Pipeline"
    else:
        out = make_tiny(args.dir, arch=args.arch, seed=args.seed)
        kind = "StableDiffusionXLPipeline" if is_xl(args.arch) else "StableDiffusionPipeline"
    print(f"wrote a {args.arch}-architecture {kind} (random weights) to {out}")


def _convert_base_cli(args):
    """Folder (or bundled name) -> one original-layout file; a single-file checkpoint -> a diffusers folder."""
    from ..bases import detect, ldm, unpack
    from ..models import FAMILIES, torch_dtype

    dtype = torch_dtype(args.dtype) if args.dtype else None
    if detect.is_single_file(args.base):
        out, family, why = unpack.write(args.base, args.out, args.base_config, dtype, args.overwrite,
                                        args.allow_pickle, args.v_pred, args.ztsnr)
        print(f"wrote {args.base} ({FAMILIES[family]}; prediction type and noise schedule from {why}) as a diffusers "
              f"folder to {out}")
        return
    if args.base_config:
        raise UserError(f"--base_config is for a single-file input; {args.base} is a folder or bundled name, which "
                        f"holds its own configs: drop --base_config")
    out, family = ldm.write(args.base, args.out, dtype, args.overwrite,
                            ("v_pred",) * args.v_pred + ("ztsnr",) * args.ztsnr)
    print(f"wrote {args.base} ({FAMILIES[family]}) as a single-file checkpoint to {out}")


def register(sub):
    def common(s, to_default=None, to_required=False):
        s.add_argument("--to", choices=formats.FORMATS, default=to_default, required=to_required,
                       help="output format" + ("" if to_required else " (default: the input's)"))
        s.add_argument("--dtype", choices=list(SAVE_PRECISIONS), help="cast the LoRA weights on write")
        s.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt/.ckpt inputs (they can run code)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    s = sub.add_parser("convert", help="convert a LoRA between diffusers, kohya (A1111/ComfyUI) and peft formats")
    s.add_argument("input", help="the LoRA file or folder to convert (any of the three layouts)")
    s.add_argument("out", help="the file or folder to write")
    common(s, to_required=True)
    s.set_defaults(func=_convert_cli)

    s = sub.add_parser("extract", help="a LoRA approximating the difference between two models (plain LoRA/LoCon "
                       "layers)")
    s.add_argument("--base", required=True, help="the original model (diffusers folder, Hub id, bundled name or "
                   "single-file checkpoint)")
    s.add_argument("--tuned", required=True, help="the fine-tuned model of the same architecture (either kind)")
    s.add_argument("--base_config", "--base-config", metavar="DIR_OR_ID", help="for a single-file --base or --tuned: "
                   "a diffusers folder or Hub id of its family, whose configs it loads with")
    s.add_argument("--rank", type=int, required=True, help="the LoRA's rank (higher: closer to the difference)")
    s.add_argument("--unet-only", action="store_true", help="ignore text-encoder differences")
    s.add_argument("out", help="the LoRA file or folder to write")
    common(s, to_default="diffusers")
    s.set_defaults(func=_extract_cli)

    s = sub.add_parser("inspect", help="show a LoRA file's format, base, architecture, ranks and metadata")
    s.add_argument("file", help="a LoRA file or folder, or a Hub id")
    s.add_argument("--json", action="store_true", help="print the description as JSON")
    s.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt/.ckpt inputs (they can run code)")
    s.set_defaults(func=_inspect_cli)

    s = sub.add_parser("merge", help="merge weighted LoRAs into one: A[:w] B[:w] … OUT (plain LoRA/LoCon files; not "
                       "DoRA, LoHa or LoKr)")
    s.add_argument("items", nargs="+", metavar="LORA[:W] … OUT")
    s.add_argument("--rank", type=int, help="SVD-reduce to this rank (default: exact, ranks concatenated)")
    common(s)
    s.set_defaults(func=_merge_cli)

    s = sub.add_parser("resize", help="reduce a LoRA's rank by SVD (plain LoRA/LoCon files; not DoRA, LoHa or LoKr)")
    s.add_argument("input", help="the LoRA file or folder to resize")
    s.add_argument("out", help="the file or folder to write")
    s.add_argument("--rank", type=int, required=True, help="the new rank (at most the file's)")
    common(s)
    s.set_defaults(func=_resize_cli)

    s = sub.add_parser("make-tiny", help="write a pipeline with random weights: tiny SD1.x/2.x/XL/SD3 layouts for "
                                         "tests, or SD 1.5's / SDXL's / SD3.5's real architecture for benchmarks")
    s.add_argument("dir", help="the folder to write the pipeline to")
    s.add_argument("--arch", default="tiny", choices=["tiny", "sd15", "sd2-tiny", "sdxl-tiny", "sdxl", "sd3",
                                                             "sd35-medium", "sd35-large"],
                   help="tiny: SD 1.x layout (default); sd15: SD 1.5's configs (~4 GB); sd2-tiny: SD 2.x layout, "
                        "v-prediction; sdxl-tiny: SDXL layout (two text encoders); sdxl: SDXL base 1.0's "
                        "configs (~13.5 GB in fp32); sd3: SD3.5 Medium's layout at tiny size (MMDiT, three text "
                        "encoders); sd35-medium / sd35-large: their published configs (~30 / ~65 GB in fp32)")
    s.add_argument("--seed", type=int, default=0, help="the random weights' seed")
    s.add_argument("--single-file", action="store_true", help="write one original-layout .safetensors checkpoint "
                   "(as A1111/ComfyUI/Civitai files are) to DIR (a *.safetensors name) instead of a folder")
    s.set_defaults(func=_make_tiny_cli)

    s = sub.add_parser("convert-base", help="convert a base model between the two layouts: a diffusers folder (or "
                       "bundled name) to one original-layout .safetensors checkpoint, as A1111/ComfyUI/Civitai files "
                       "are, or such a single-file checkpoint to a diffusers folder")
    s.add_argument("base", help="a diffusers SD 1.x/2.x/XL folder or bundled name (sdlora-tiny, sdlora-tiny-xl), or a "
                   "single-file checkpoint (a local .safetensors or a Hub file path owner/repo/file.safetensors)")
    s.add_argument("out", help="the *.safetensors file to write (from a folder), or the folder to write (from a "
                   "single file)")
    s.add_argument("--base_config", "--base-config", metavar="DIR_OR_ID", help="for a single-file input: a diffusers "
                   "folder or Hub id of its family, whose configs and tokenizers the folder gets (default: the repo "
                   "diffusers picks for the file, downloaded)")
    s.add_argument("--dtype", choices=list(SAVE_PRECISIONS), help="cast the weights on write (default: as stored)")
    s.add_argument("--v-pred", action="store_true", help="a v-prediction model: add ComfyUI's v_pred marker key "
                   "(writing a file), or set the scheduler's prediction_type (writing a folder)")
    s.add_argument("--ztsnr", action="store_true", help="a zero-terminal-SNR model: add ComfyUI's ztsnr marker key "
                   "(writing a file), or set the scheduler's rescale_betas_zero_snr (writing a folder)")
    s.add_argument("--allow-pickle", action="store_true", help="allow a .ckpt/.pt single-file input (it can run code)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file or folder")
    s.set_defaults(func=_convert_base_cli)
