"""kohya sd-scripts' --dataset_config TOML, with its schema and meanings (library/config_util.py): `[general]`,
`[[datasets]]` and `[[datasets.subsets]]`. A subset's setting falls back to its dataset's, then [general]'s, then the
command line's flag (then the flag's default), as kohya's do. Each subset is a folder with its own repeats, caption
options and augmentation; each dataset its own resolution and buckets, so one run can train the same images at two
resolutions (batches never mix datasets). `is_reg` subsets are regularisation images (DreamBooth's prior
preservation): weighted by --prior_loss_weight and repeated to as many as the training images, as kohya does.
A kohya key sdlora does not support is one line naming it, never ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .. import tomlfile
from ..errors import UserError
from . import masks
from .buckets import Bucketing
from .captions import CaptionOps, check_keep_tokens, checked
from .sources import Row, rows_from_folder
from .trainset import Part

# key -> the types a value may have (kohya's schema); a float key also takes an int
SUBSET = {"num_repeats": int, "caption_extension": str, "class_tokens": str, "keep_tokens": int,
          "shuffle_caption": bool, "caption_dropout_rate": float, "caption_tag_dropout_rate": float,
          "flip_aug": bool, "keep_tokens_separator": str, "caption_separator": str}
SUBSET_ONLY = {"image_dir": str, "is_reg": bool, "alpha_mask": bool}
DATASET = {"resolution": (int, list, str), "batch_size": int, "enable_bucket": bool, "min_bucket_reso": int,
           "max_bucket_reso": int, "bucket_reso_steps": int, "bucket_no_upscale": bool}
KOHYA_ONLY = {"color_aug", "face_crop_aug_range", "random_crop", "caption_prefix", "caption_suffix", "token_warmup_min",
              "token_warmup_step", "caption_dropout_every_n_epochs", "secondary_separator", "enable_wildcard",
              "cache_info", "metadata_file", "conditioning_data_dir", "custom_attributes", "validation_seed",
              "validation_split", "resize_interpolation", "network_multiplier", "debug_dataset"}
FLAG = "--dataset_config"


@dataclass(frozen=True)
class Subset:
    image_dir: Path
    num_repeats: int
    caption_extension: str
    class_tokens: str | None
    is_reg: bool
    alpha_mask: bool
    flip_aug: bool
    captions: CaptionOps | None


@dataclass(frozen=True)
class Dataset:
    bucketing: Bucketing  # its resolution and buckets
    batch_size: int
    subsets: tuple[Subset, ...]


def read(path, fallback: dict) -> list[Dataset]:
    """The datasets of the file at `path`, each key checked; `fallback`: the flags' values under kohya's names (the
    resolved `resolution` and `bucket_reso_steps` among them)."""
    where = f"{FLAG} {path}"
    doc = tomlfile.read(path, FLAG)
    _known(doc, {"general", "datasets"}, where, "top level")
    general = doc.get("general", {})
    _check(general, {**SUBSET, **DATASET}, where, "[general]")
    datasets = doc.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise UserError(f"{where}: no [[datasets]] table; each needs [[datasets.subsets]] with an image_dir")
    out = []
    for i, d in enumerate(datasets, 1):
        _check({k: v for k, v in d.items() if k != "subsets"}, {**SUBSET, **DATASET}, where, f"dataset {i}")
        subsets = d.get("subsets")
        if not isinstance(subsets, list) or not subsets:
            raise UserError(f"{where}: dataset {i} has no [[datasets.subsets]] (each with an image_dir)")
        for j, s in enumerate(subsets, 1):
            _check(s, {**SUBSET, **SUBSET_ONLY}, where, f"dataset {i} subset {j}")
            if "image_dir" not in s:
                raise UserError(f"{where}: dataset {i} subset {j} has no image_dir")
        out.append(_dataset(d, general, fallback, Path(path).expanduser().parent, where, i))
    return out


def _known(table: dict, keys: set, where: str, what: str):
    if extra := sorted(set(table) - keys):
        raise UserError(f"{where}: {what}: unknown key{'s' * (len(extra) > 1)} {', '.join(extra)}")


def _check(table: dict, schema: dict, where: str, what: str):
    """Every key known and of its type; kohya's keys sdlora does not support: one line each."""
    lines = []
    for k, v in table.items():
        if k in KOHYA_ONLY:
            lines.append(f"{where}: {what}: {k}: kohya's dataset setting has no sdlora equivalent")
        elif k not in schema:
            lines.append(f"{where}: {what}: unknown key {k!r}")
        else:
            want = schema[k] if isinstance(schema[k], tuple) else (schema[k],)
            want = want + (int,) * (float in want)
            if not isinstance(v, want) or (isinstance(v, bool) and bool not in want):
                lines.append(f"{where}: {what}: {k} = {tomlfile.value(v) if not isinstance(v, dict) else '{…}'}: "
                             f"expected {' or '.join(t.__name__ for t in want)}")
    if lines:
        raise UserError("\n".join(lines))


def _square(v, where: str, what: str) -> int:
    """kohya's resolution: 512, [512, 512] or "512,512"; sdlora trains square sizes (buckets keep aspect ratios)."""
    sides = v if isinstance(v, list) else str(v).split(",") if isinstance(v, str) else [v]
    try:
        sides = {int(str(s).strip()) for s in sides}
    except ValueError:
        sides = set()
    if len(sides) != 1 or min(sides) < 1:
        raise UserError(f"{where}: {what}: resolution = {tomlfile.value(v)}: one square size (e.g. 512)")
    return sides.pop()


def _dataset(d: dict, general: dict, fallback: dict, base: Path, where: str, i: int) -> Dataset:
    def get(k):
        return d[k] if k in d else general[k] if k in general else fallback.get(k)
    res = _square(get("resolution"), where, f"dataset {i}")
    enabled = get("enable_bucket") if "enable_bucket" in d or "enable_bucket" in general else \
        fallback.get("enable_bucket", True)
    bucketing = Bucketing(res, enabled=bool(enabled), min_reso=get("min_bucket_reso"), max_reso=get("max_bucket_reso"),
                          step=get("bucket_reso_steps"), no_upscale=bool(get("bucket_no_upscale")))
    bucketing.table()  # sizes that leave no bucket: one line now
    subsets = tuple(_subset(s, d, general, fallback, base, where, f"dataset {i} subset {j}")
                    for j, s in enumerate(d["subsets"], 1))
    return Dataset(bucketing, int(get("batch_size") or 1), subsets)


def _subset(s: dict, d: dict, general: dict, fallback: dict, base: Path, where: str, what: str) -> Subset:
    def get(k):
        return next((t[k] for t in (s, d, general) if k in t), fallback.get(k))
    folder = Path(s["image_dir"]).expanduser()
    # relative paths: to the working folder, as kohya reads them
    if not folder.is_dir():
        raise UserError(f"{where}: {what}: image_dir {folder}: no such folder")
    if (n := get("num_repeats") or 1) < 1:
        raise UserError(f"{where}: {what}: num_repeats must be >= 1")
    try:
        ops = checked(CaptionOps(shuffle=bool(get("shuffle_caption")), keep_tokens=get("keep_tokens") or 0,
                                 keep_tokens_separator=get("keep_tokens_separator") or "",
                                 dropout_rate=float(get("caption_dropout_rate") or 0),
                                 tag_dropout_rate=float(get("caption_tag_dropout_rate") or 0),
                                 separator=get("caption_separator") or ","))
    except UserError as e:
        raise UserError(f"{where}: {what}: {e}") from None
    return Subset(folder, n, get("caption_extension") or ".caption", get("class_tokens"), bool(s.get("is_reg")),
                  bool(s.get("alpha_mask", fallback.get("alpha_mask"))), bool(get("flip_aug")), ops)


def batch_size(path) -> int | None:
    """The one batch size the file's datasets set (None: they set none); datasets with different ones are a
    UserError (sdlora trains one batch size)."""
    doc = tomlfile.read(path, FLAG)
    general = doc.get("general", {}).get("batch_size")
    sizes = {d.get("batch_size", general) for d in doc.get("datasets", []) if isinstance(d, dict)}
    if len(sizes) > 1:
        raise UserError(f"{FLAG} {path}: datasets with different batch_size ({', '.join(map(str, sorted(sizes, key=str)))}"
                        f"): sdlora trains one batch size; set it in [general]")
    return next(iter(sizes), None)


@dataclass
class Collected:
    """What the datasets train on: rows, examples (lists of row ids), loss groups (1: is_reg), each row's part."""
    rows: list[Row]
    examples: list[list[int]]
    groups: list[int]
    parts: list[Part]
    row_parts: list[int]


def layout(datasets: list[Dataset], caption_column: str, allow_empty: bool) -> Collected:
    """Rows and examples of every subset: each training image num_repeats times (times its N_name folder's N); a
    dataset's regularisation images repeated up to as many as its training examples, as kohya's DreamBooth dataset
    does."""
    out = Collected([], [], [], [], [])
    for i, d in enumerate(datasets):
        train, reg = [], []
        for s in d.subsets:
            rows = _subset_rows(s, caption_column, allow_empty)
            k = len(out.parts)
            out.parts.append(Part(f"dataset {i + 1}: {s.image_dir.name}", i, d.bucketing, s.flip_aug, s.captions))
            first = len(out.rows)
            out.rows += rows
            out.groups += [int(s.is_reg)] * len(rows)
            out.row_parts += [k] * len(rows)
            (reg if s.is_reg else train).extend((first + j, r.repeats * s.num_repeats) for j, r in enumerate(rows))
        if not train:
            raise UserError(f"{FLAG}: dataset {i + 1}: every subset is is_reg; regularisation images need training "
                            "images beside them")
        n = len(out.examples)
        out.examples += [[r] for r, k in train for _ in range(k)]
        out.examples += [[r] for r, k in _balanced(reg, len(out.examples) - n) for _ in range(k)]
    return out


def _balanced(reg: list[tuple[int, int]], need: int) -> list[tuple[int, int]]:
    """kohya's rule: each regularisation image its repeats once, then one more each in turn until they are as many
    as the training images."""
    counts, n = {}, 0
    for r, k in reg:
        counts[r], n = k, n + k
        if n >= need:
            return list(counts.items())
    while reg and n < need:
        for r, _ in reg:
            counts[r] += 1
            n += 1
            if n >= need:
                break
    return list(counts.items())


def _subset_rows(s: Subset, caption_column: str, allow_empty: bool) -> list[Row]:
    what = f"{FLAG} image_dir {s.image_dir}"
    rows = rows_from_folder(s.image_dir, caption_column, True, what=what, caption_extension=s.caption_extension)
    rows = [replace(r, caption=r.caption or s.class_tokens or "") for r in rows]
    if not allow_empty and (bare := [r for r in rows if not r.caption]):
        raise UserError(f"{what}: {bare[0].name} has no {s.caption_extension} caption and the subset no class_tokens; "
                        "add one of them (or --allow_empty_captions)")
    check_keep_tokens(s.captions, rows)
    if s.alpha_mask:
        masks.attach(rows, None, [s.image_dir])
    return rows
