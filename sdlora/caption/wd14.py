"""A WD14-style booru tagger (SmilingWolf's wd-*-tagger-v2/v3: `model.onnx` + `selected_tags.csv`), run with
onnxruntime as kohya's tag_images_by_wd14_tagger.py --onnx runs it: each image padded to a white square, resized to
the model's input size, fed as BGR 0-255 in channels-last order; the model's outputs are the tags' probabilities.

The options are kohya's: general and character thresholds, undesired tags, underscores to spaces, character tags
first, the rating tag first."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .tags import SEPARATOR, join_tags, no_underscores

# selected_tags.csv's category column
GENERAL, CHARACTER, RATING = 0, 4, 9


@dataclass(frozen=True)
class TagOptions:
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    undesired: frozenset = frozenset()  # tags never written (as the csv spells them, or with spaces)
    remove_underscore: bool = False
    character_first: bool = False
    rating: bool = False
    separator: str = SEPARATOR

    def check(self):
        for flag, v in (("general_threshold", self.general_threshold),
                        ("character_threshold", self.character_threshold)):
            if not 0 < v < 1:
                raise UserError(f"--{flag} {v}: give a probability between 0 and 1, e.g. 0.35")
        return self


def read_tags(path: Path) -> list[tuple[str, int]]:
    """(name, category) per model output, from selected_tags.csv (tag_id,name,category,count)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [(r["name"], int(r["category"])) for r in rows]
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        raise UserError(f"{path}: not a tagger's tag list (tag_id,name,category,count) ({why})") from None


class Tagger:
    """Tags for a batch of images: `tagger(images) -> [caption]`, each the tags joined by the separator."""
    tags = True  # its captions are tag lists: the summary counts them

    def __init__(self, folder: Path, device: str = "cpu", options: TagOptions = TagOptions()):
        import onnxruntime as ort

        self.options = options.check()
        self.names = read_tags(folder / "selected_tags.csv")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=providers)
        except Exception as e:  # onnxruntime raises its own types for a damaged or foreign file
            raise UserError(f"{folder / 'model.onnx'}: onnxruntime can't load it ({str(e).splitlines()[0][:200]})") \
                from None
        self.input = self.session.get_inputs()[0]
        self.size = self.input.shape[1]
        if not isinstance(self.size, int) or self.input.shape[3] != 3:
            raise UserError(f"{folder / 'model.onnx'}: expected an input of shape (batch, size, size, 3), "
                            f"got {self.input.shape}")
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.names):
            raise UserError(f"{folder}: model.onnx has {outputs} outputs but selected_tags.csv lists "
                            f"{len(self.names)} tags; they belong to different models")
        self.device = providers[0].removesuffix("ExecutionProvider").lower()

    def pixels(self, image):
        """The model's input for one RGB image: a white square around it, resized, BGR, float 0-255."""
        import numpy as np
        from PIL import Image

        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        square = square.resize((self.size, self.size), Image.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]

    def __call__(self, images) -> list[str]:
        import numpy as np

        batch = np.stack([self.pixels(im) for im in images])
        probs = self.session.run(None, {self.input.name: batch})[0]
        return [self.caption(p) for p in probs]

    def caption(self, probs) -> str:
        o = self.options
        undesired = o.undesired | {no_underscores(t) for t in o.undesired}
        ranked = sorted(zip(probs.tolist(), range(len(self.names))), reverse=True)
        kept, character, rating = [], [], []  # kept: by probability, the likeliest first
        for p, i in ranked:
            name, category = self.names[i]
            if category == RATING:
                rating.append(name)
                continue
            threshold = o.character_threshold if category == CHARACTER else o.general_threshold
            name = no_underscores(name) if o.remove_underscore else name
            if p >= threshold and name not in undesired:
                kept.append(name)
                character += [name] * (category == CHARACTER)
        if o.character_first:
            kept = character + [t for t in kept if t not in character]
        tags = ([rating[0]] if o.rating and rating else []) + kept
        return join_tags(tags, o.separator)
