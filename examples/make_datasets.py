"""Write the example data sets (deterministic; the committed copies in examples/data/ are its output).

    python examples/make_datasets.py                 # rewrites examples/data/{pokemon,dreambooth}
    python examples/make_datasets.py --out /tmp/data

pokemon/     144 captioned 32 px images in HF imagefolder layout (PNG + metadata.jsonl with
             file_name/text): the base data's shapes drawn as creatures — thick black outline,
             two white eyes with pupils — a look the base model never saw.  Captions use only the
             base model's words ("a red circle on a blue background"); pairs come from the base
             model's training pairs, so held-out pairs stay held out for evaluation.
dreambooth/  instance/: 8 images of one subject — a square with a cyan/magenta 2x2 checker, in
             different positions and sizes, on 4 of the 8 backgrounds (shapes.SUBJECT_PHOTO_BGS) (imagefolder layout, every caption is
             the instance prompt); prompts.json: instance prompt "a sks square" (rare
             identifier "sks") and class prompt "a square".
Detectors for both looks are shapes.style_score / shapes.subject_score.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import shapes  # the example data's generator and detectors (beside this script)

DATA = Path(__file__).resolve().parent / "data"


def _write_folder(folder: Path, items):
    """items: (PIL image, caption); writes NNNN.png + metadata.jsonl."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    lines = []
    for i, (img, text) in enumerate(items):
        name = f"{i:04d}.png"
        img.save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def pokemon_items(n: int = 144, seed: int = 1):
    """Every (training colour pair, shape) in turn, random size and position: balanced colours, so
    a LoRA learns the look rather than a bias toward the colours it happened to see most."""
    rng = random.Random(seed)
    combos = [(pair, sh) for pair in shapes.train_pairs() for sh in shapes.SHAPES]
    rng.shuffle(combos)
    items = []
    for i in range(n):
        pair, sh = combos[i % len(combos)]
        s = shapes.random_spec(rng, pairs=[pair], shapes=(sh,))
        items.append((shapes.render(s, "creature"), shapes.caption(s["shape"], s["colour"], s["bg"])))
    return items


def dreambooth_items(n: int = 8, seed: int = 2):
    """n photos of the subject at different sizes and positions, on the photo backgrounds in turn: the
    other backgrounds stay unseen, so a LoRA is measured in contexts its photos never showed."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        bg = shapes.SUBJECT_PHOTO_BGS[i % len(shapes.SUBJECT_PHOTO_BGS)]
        s = shapes.random_spec(rng, pairs=[("gray", bg)], shapes=("square",))
        # captioned with its context, for --instance_captions; without it the trainer gives every photo the
        # instance prompt, as diffusers' script does
        items.append((shapes.render(s, "subject"), f"{shapes.INSTANCE_PROMPT} on {shapes.with_article(bg)} background"))
    return items


def make(out: Path = DATA, n_pokemon: int = 144, n_dreambooth: int = 8) -> Path:
    _write_folder(out / "pokemon", pokemon_items(n_pokemon))
    _write_folder(out / "dreambooth" / "instance", dreambooth_items(n_dreambooth))
    (out / "dreambooth" / "prompts.json").write_text(json.dumps({
        "instance_prompt": shapes.INSTANCE_PROMPT, "class_prompt": shapes.CLASS_PROMPT,
        "identifier": shapes.DREAMBOOTH_TOKEN, "class": "square",
    }, indent=2) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DATA)
    p.add_argument("--pokemon", type=int, default=144)
    p.add_argument("--dreambooth", type=int, default=8)
    args = p.parse_args(argv)
    out = make(args.out, args.pokemon, args.dreambooth)
    print(f"wrote {args.pokemon} pokemon-style and {args.dreambooth} dreambooth images under {out}")


if __name__ == "__main__":
    main()
