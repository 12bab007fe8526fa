"""`sdlora caption DIR --model ID_OR_FOLDER`: a caption file beside each image, from a captioner (BLIP,
Florence-2, a VLM) or a WD14 booru tagger (the work: sdlora/caption/)."""
from __future__ import annotations

import sys

from ..caption.captioners import MAX_LENGTHS, PROMPTS
from ..caption.tags import SEPARATOR
from ..caption.wd14 import TagOptions
from ..errors import UserError


def register(sub):
    s = sub.add_parser("caption", help="caption or tag a folder of images (BLIP, Florence-2, a VLM, a WD14 tagger; "
                                       "needs pip install \"sdlora[caption]\" for taggers)")
    s.add_argument("dir", help="the folder of images; each gets a same-name caption file")
    s.add_argument("--model", required=True, metavar="ID_OR_FOLDER",
                   help="a Hub id or local folder: e.g. Salesforce/blip-image-captioning-large, "
                        "florence-community/Florence-2-base, Qwen/Qwen2.5-VL-3B-Instruct, SmilingWolf/wd-vit-tagger-v3")
    s.add_argument("--prefix", default="", help="text put before every caption, e.g. a trigger word")
    s.add_argument("--suffix", default="", help="text put after every caption")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace existing captions (default: skip those images)")
    mode.add_argument("--append", action="store_true", help="add the new tags to existing captions (tags already "
                      "there are not repeated)")
    s.add_argument("--caption_extension", default=".txt", help="the caption files' extension (default: .txt, what "
                   "the trainers read)")
    s.add_argument("--caption_separator", default=SEPARATOR,
                   help="what joins the prefix, tags and suffix (default: '%(default)s')")
    s.add_argument("--recursive", action="store_true", help="caption sub-folders too (kohya's 10_name repeat folders)")
    s.add_argument("--batch_size", type=int, default=1, help="images per forward pass (default: 1)")
    s.add_argument("--dry_run", action="store_true", help="print what would be written; write nothing")
    s.add_argument("--prompt", help=f"the text given with each image: Florence-2's task (default "
                   f"{PROMPTS['florence2']}), a VLM's instruction, or the start of a BLIP caption (default: none)")
    s.add_argument("--max_length", type=int, help=f"new tokens per caption at most (default: {MAX_LENGTHS['blip']} "
                   f"for BLIP, {MAX_LENGTHS['florence2']} for Florence-2, {MAX_LENGTHS['vlm']} for VLMs)")
    s.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: a CUDA GPU if there is one)")
    s.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="captioners' precision (default: fp16 on a "
                   "CUDA GPU, bf16 on a CPU that computes it natively, else fp32; taggers run their ONNX file as is)")
    t = s.add_argument_group("WD14 tagger (kohya's tag_images_by_wd14_tagger.py options)")
    t.add_argument("--general_threshold", type=float, default=TagOptions.general_threshold,
                   help="keep general tags this likely (default: %(default)s)")
    t.add_argument("--character_threshold", type=float, default=TagOptions.character_threshold,
                   help="keep character tags this likely (default: %(default)s)")
    t.add_argument("--undesired_tags", default="", help="comma-separated tags never written")
    t.add_argument("--remove_underscore", action="store_true",
                   help="long_hair -> long hair (tags longer than 3 characters, so ^_^ stays)")
    t.add_argument("--character_tags_first", action="store_true", help="character tags before general ones")
    t.add_argument("--use_rating_tags", action="store_true", help="the likeliest rating tag (general, sensitive, …) "
                   "first")
    s.set_defaults(func=_caption_cli)


def _caption_cli(args):
    from tqdm.auto import tqdm

    from ..caption import folder, models
    from ..caption.run import Summary, Wording, caption_folder

    if args.max_length is not None and args.max_length < 1:
        raise UserError(f"--max_length {args.max_length}: must be at least 1")
    mode = "overwrite" if args.overwrite else "append" if args.append else "skip"
    options = TagOptions(args.general_threshold, args.character_threshold,
                         frozenset(t.strip() for t in args.undesired_tags.split(",") if t.strip()),
                         args.remove_underscore, args.character_tags_first, args.use_rating_tags,
                         args.caption_separator).check()
    source = models.identify(args.model)
    device, dtype = models.device_and_precision(args.device, args.dtype)
    plan = folder.plan(args.dir, args.caption_extension, mode, args.recursive)
    if not plan.items:
        print(f"nothing to caption in {args.dir}; " + Summary(skipped=plan.skipped).text(), file=sys.stderr)
        return 0
    what = models.FAMILIES[source.family]
    print(f"{what} {args.model} on {device}" + ("" if source.family == "wd14" else f" in {dtype}") +
          f": {len(plan.items)} image(s)", file=sys.stderr)
    captioner = models.load(source, device, dtype, args.prompt, args.max_length, options)
    bar = tqdm(total=len(plan.items), unit="img", desc="captioning", file=sys.stderr)

    def on_batch(done, total):
        bar.update(done - bar.n)

    try:
        summary = caption_folder(plan, captioner, Wording(args.prefix, args.suffix, args.caption_separator),
                                 args.batch_size, args.dry_run, on_batch)
    finally:
        bar.close()
    if args.dry_run:
        for path, text in summary.written:
            print(f"{path}: {text}")
    print(summary.text(), file=sys.stderr)
