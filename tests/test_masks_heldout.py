"""Masked loss and the held-out validation loss (issue #14)."""
import re

import numpy as np
import pytest
import torch
from conftest import make_images
from helpers import T2I, fast_flags, recipe_error, run
from PIL import Image, ImageDraw

from sdlora.recipes import text_to_image as t2i
from sdlora.data import masks
from sdlora.data.buckets import Bucketing
from sdlora.data.sources import rows_from_folder, split_heldout
from sdlora.data.trainset import Examples, TrainSet
from sdlora.errors import UserError
from sdlora.testing import disc_and_noise, subject_on_noise


# ---------------------------------------------------------------- masks

def test_mask_follows_the_image_through_bucket_crop_and_flip(tmp_path):
    img = Image.new("RGBA", (48, 32), (0, 0, 255, 0))
    ImageDraw.Draw(img).rectangle((0, 0, 13, 31), fill=(255, 0, 0, 255))  # opaque red stripe on the left
    img.save(tmp_path / "a.png")
    rows = rows_from_folder(tmp_path, allow_empty_captions=True)
    masks.attach(rows, None)
    assert rows[0].mask == "alpha"
    data = Examples(TrainSet(rows, [[0]] * 12, [0], 32, False, True, Bucketing(32, step=8)), seed=0, pixels=True)
    flips = set()
    for i in range(12):
        item = data[(0, i)]
        px, m = item["pixel_values"][0], item["masks"][0]
        assert px.shape[-2:] == m.shape[-2:] == (24, 40)  # the 3:2 bucket, not a square
        red = px[1] < 0  # composited on white: green = 1 - 2 * opacity, resized alike
        assert torch.equal(red, m[0] > 0.5)  # learned exactly where the opaque subject is
        flips.add(bool(m[0, :, 0].mean() > 0.5))
    assert flips == {True, False}  # some flipped, some not: the mask flipped with them


def test_bad_masks_are_one_line_before_any_model_loads(tiny_model, tmp_path, capsys, no_model_loads):
    data, mdir = subject_on_noise(tmp_path / "d", tmp_path / "m", n=2)
    Image.new("L", (16, 16), 255).save(mdir / "1.png")
    line = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, masked_loss=True,
                                                mask_dir=mdir))
    assert "1.png: mask is 16x16 but its image" in line and "32x32" in line
    plain = make_images(tmp_path / "plain", n=2)
    line = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=plain, masked_loss=True))
    assert "no image has transparency" in line
    line = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=plain, mask_dir=mdir))
    assert "--mask_dir is only read with --masked_loss" in line


def test_mask_files_as_users_make_them(tmp_path):
    """A cut-out (transparent background) masks by its alpha, a grey mask by its grey, a float mask in 0..1 is scaled;
    masks sit at their image's path inside --mask_dir, so kohya sub-folders may reuse file names."""
    from sdlora.data.images import read_mask

    cut = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    cut.paste((40, 60, 30, 255), (0, 0, 4, 8))  # a dark subject, opaque, on a transparent background
    cut.save(tmp_path / "cut.png")
    m = np.asarray(read_mask(tmp_path / "cut.png", alpha=False))
    assert (m[:, :4] == 255).all() and (m[:, 4:] == 0).all()
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    assert np.asarray(read_mask(tmp_path / "f.tif", alpha=False)).min() == 128
    opaque = Image.new("RGBA", (8, 8), (10, 200, 10, 255))
    opaque.save(tmp_path / "opaque.png")  # alpha that is all opaque is no mask

    data, mdir = tmp_path / "d", tmp_path / "m"
    for sub, size in (("5_dog", (32, 32)), ("2_cat", (32, 48))):
        (data / sub).mkdir(parents=True)
        (mdir / sub).mkdir(parents=True)
        Image.new("RGB", size, (9, 9, 9)).save(data / sub / "a.png")
        Image.new("L", size, 255).save(mdir / sub / "a.png")
    rows = rows_from_folder(data, allow_empty_captions=True)
    masks.attach(rows, mdir, [data])
    assert sorted(r.mask.relative_to(mdir).as_posix() for r in rows) == ["2_cat/a.png", "5_dog/a.png"]
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (32, 32), 255).save(flat / "a.png")
    with pytest.raises(UserError, match="'a' names more than one image or mask"):
        masks.attach(rows_from_folder(data, allow_empty_captions=True), flat, [data])
    rows = rows_from_folder(make_images(tmp_path / "plain", n=1))
    Image.open(tmp_path / "opaque.png").save(rows[0].image)
    with pytest.raises(UserError, match="no image has transparency"):
        masks.attach(rows, None, [tmp_path / "plain"])


def test_masked_loss_learns_the_subject_colour_and_not_the_noise(tmp_path):
    """On the bundled model: a yellow disc on noise, trained with and without its mask. Both learn the disc's
    colour; without the mask the LoRA also learns to paint noise (high-frequency energy around the disc)."""
    data, mdir = subject_on_noise(tmp_path / "d", tmp_path / "m")
    common = dict(train_data_dir=data, max_train_steps=100, train_batch_size=4, learning_rate=5e-3, rank=8,
                  center_crop=True)
    run(T2I, fast_flags("sdlora-tiny", tmp_path / "masked", masked_loss=True, mask_dir=mdir, **common),
        OMP_NUM_THREADS="2")
    run(T2I, fast_flags("sdlora-tiny", tmp_path / "whole", **common), OMP_NUM_THREADS="2")
    base_colour, base_noise = disc_and_noise(None)
    colour, noise = disc_and_noise(tmp_path / "masked")
    _, whole_noise = disc_and_noise(tmp_path / "whole")
    assert colour[2] < 80 < base_colour[2], (colour, base_colour)  # the disc turned yellow (blue channel down)
    assert whole_noise - base_noise > 1.0, (whole_noise, base_noise)  # unmasked: noise learned...
    assert noise - base_noise < 0.5 * (whole_noise - base_noise), (noise, whole_noise, base_noise)  # masked: not


# ---------------------------------------------------------------- held-out loss

def test_split_is_stable_and_leaves_something_to_train_on(tmp_path):
    rows = rows_from_folder(make_images(tmp_path / "d", n=6))
    train, held = split_heldout(rows, 0.34)
    assert len(held) == 2 and len(train) == 4 and not {r.name for r in held} & {r.name for r in train}
    moved = rows_from_folder(make_images(tmp_path / "elsewhere" / "d", n=6))
    assert [r.image.name for r in split_heldout(moved, 0.34)[1]] == [r.image.name for r in held]
    with pytest.raises(UserError, match="leaves none to train on"):
        split_heldout(rows[:1], 0.5)


def test_held_out_flags_are_checked_first(tiny_model, tmp_path, capsys, no_model_loads):
    data = make_images(tmp_path / "d", n=4)
    for flags, msg in (({"validation_split": 1.5}, "between 0 and 1"),
                       ({"validation_split": 0.2, "validation_data_dir": data}, "not both"),
                       ({"validation_loss_steps": 2}, "needs held-out images"),
                       ({"validation_data_dir": tmp_path / "nope"}, "not a folder"),
                       ({"validation_data_dir": data}, "overlaps --train_data_dir")):
        line = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, **flags))
        assert msg in line, line


def _val_losses(stderr):
    return [float(v) for v in re.findall(r"val_loss=([0-9.]+)", stderr)]


def test_validation_loss_is_fixed_for_fixed_weights_and_reports_its_lowest_step(tiny_model, tmp_path):
    data = make_images(tmp_path / "d", n=6)
    flags = dict(train_data_dir=data, validation_split=0.34, validation_loss_steps=2, max_train_steps=4)
    a = run(T2I, fast_flags(tiny_model, tmp_path / "a", seed=0, **flags))
    b = run(T2I, fast_flags(tiny_model, tmp_path / "b", seed=1, **flags))
    before = [re.search(r"validation loss before training: ([0-9.]+)", r.stderr).group(1) for r in (a, b)]
    assert before[0] == before[1]  # the same (base) weights, other seeds: the same number
    assert "validation loss on 2 held-out images" in a.stderr and "training text-to-image LoRA: 4 rows" in a.stderr
    m = re.search(r"lowest validation loss ([0-9.]+) at step (\d) \(of 4\)", a.stderr)
    assert m and int(m.group(2)) in (0, 2, 4)
    assert f"lowest validation loss | {m.group(1)} at step {m.group(2)}" in (tmp_path / "a" / "README.md").read_text()


def test_validation_data_dir_and_resume_keep_the_lowest(tiny_model, tmp_path):
    data, held = make_images(tmp_path / "d", n=4), make_images(tmp_path / "v", n=2)
    flags = dict(train_data_dir=data, validation_data_dir=held, validation_loss_steps=1, checkpointing_steps=2)
    full = run(T2I, fast_flags(tiny_model, tmp_path / "full", max_train_steps=4, **flags))
    run(T2I, fast_flags(tiny_model, tmp_path / "part", max_train_steps=2, **flags))
    resumed = run(T2I, fast_flags(tiny_model, tmp_path / "part", max_train_steps=4, resume_from_checkpoint="latest",
                                  **flags))
    line = re.compile(r"lowest validation loss ([0-9.]+) at step (\d)")
    assert line.search(full.stderr).groups() == line.search(resumed.stderr).groups()
