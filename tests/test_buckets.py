"""Aspect-ratio bucketing (issue #14): the table, the assignment, and real training runs on a folder of
mixed photo shapes — buckets, caching, exact resume, DDP and DreamBooth."""
import re
import subprocess

import pytest
import torch
from conftest import make_images
from helpers import DREAMBOOTH, ROOT, T2I, accelerate_launch, env, fast_flags, read_lora, recipe_error, run

from sdlora.recipes import text_to_image as t2i
from sdlora.data.buckets import Bucketing, kept
from sdlora.errors import UserError
from sdlora.testing import PHOTO_SHAPES, photo_folder

WEIGHTS = "pytorch_lora_weights.safetensors"


def test_table_has_the_shapes_photos_come_in():
    b = Bucketing(512, step=64)
    table = b.table()
    assert (512, 512) in table and (384, 576) in table and (576, 384) in table
    assert all(w % 64 == 0 and h % 64 == 0 and 0.8 * 512 ** 2 <= w * h <= 512 ** 2 for w, h in table)
    assert all(256 <= s <= 1024 for wh in table for s in wh)  # kohya's defaults at 512: resolution/2 .. 2x
    assert b.assign((2000, 3000), table) == (384, 576) and kept((2000, 3000), (384, 576)) == 1.0
    assert b.assign((1080, 1920), table) == (384, 640)  # 9:16 -> the nearest shape: 93.75 % kept
    assert b.assign((3000, 3000), table) == (512, 512)
    assert Bucketing(512, enabled=False).assign((2000, 3000), table) == (512, 512)


def test_each_row_carries_its_original_size_and_crop_for_sdxl(tmp_path):
    from sdlora.data.sources import rows_from_folder
    from sdlora.data.trainset import Examples, TrainSet

    rows = rows_from_folder(photo_folder(tmp_path / "photos"))
    data = TrainSet(rows, [[i] for i in range(len(rows))], [0] * len(rows), 64, False, False, Bucketing(64, step=8))
    i = next(i for i, r in enumerate(rows) if r.image.name == "landscape_16x9.png")
    geo = Examples(data, seed=0, pixels=True)[(0, i)]["geometry"][0]
    # SDXL's order: original (h, w), crop top-left (top, left), target (h, w); the 128x72 image covers the
    # 80x48 bucket at 85x48 and loses a random sliver of at most 5 columns
    assert geo[:2] == (72, 128) and geo[2] == 0 and 0 <= geo[3] <= 5 and geo[4:] == (48, 80)
    flipped = TrainSet(rows, data.examples, data.groups, 64, True, True, Bucketing(64, step=8))
    lays = [flipped.layout(i, 0, 0, (i, k)) for k in range(8)]
    assert {lay.flip for lay in lays} == {True, False}  # centre crop of 85 -> 80 columns: 2 left, 3 right
    assert {lay.geometry()[3] for lay in lays} == {2, 3}  # a flipped crop is measured from its new left edge


def test_no_upscale_keeps_small_images_small():
    b = Bucketing(512, step=64, no_upscale=True)
    assert b.assign((300, 200), b.table()) == (256, 192)  # floored to whole steps, not enlarged
    assert b.assign((40, 40), b.table()) is None  # smaller than one step: skipped (named in the log)
    assert b.assign((2000, 3000), b.table()) == (384, 576)


def test_settings_that_leave_no_bucket_are_one_line(tiny_model, tmp_path, capsys, no_model_loads):
    with pytest.raises(UserError, match="leave no bucket"):
        Bucketing(512, min_reso=1024, max_reso=2048).table()
    data = make_images(tmp_path / "d", n=2)
    for flags, msg in ((["--min_bucket_reso", "1024", "--max_bucket_reso", "2048"], "leave no bucket"),
                       (["--min_bucket_reso", "96", "--max_bucket_reso", "48"], "larger than --max_bucket_reso"),
                       (["--bucket_reso_steps", "6"], "must be a multiple of 4, the VAE's downsampling"),
                       (["--bucket_reso_steps", "0"], "--bucket_reso_steps must be >= 1")):
        line = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data) + flags)
        assert msg in line, line


def _kept(stderr: str) -> tuple[float, float]:
    m = re.search(r"(\d+\.\d)% of each image's area kept on average \(a square \d+ crop would keep (\d+\.\d)%\)", stderr)
    assert m, stderr[-3000:]
    return float(m.group(1)), float(m.group(2))


def test_mixed_photo_shapes_train_in_buckets_and_keep_what_a_square_crop_cuts(tiny_model, tmp_path):
    data = photo_folder(tmp_path / "photos")
    out = tmp_path / "o"
    r = run(T2I, fast_flags(tiny_model, out, train_data_dir=data, resolution=64, center_crop=True, max_train_steps=3,
                            enable_bucket=True))  # kohya's flag: accepted, buckets are the default
    ours, square = _kept(r.stderr)
    assert ours >= 95.0 and square < 80.0, (ours, square)
    table = re.search(r"aspect-ratio buckets \(w x h: images\): (.*?);", r.stderr).group(1)
    assert "48x72: 1" in table and "72x48: 1" in table and "64x64: 2" in table, table  # 2:3, 3:2, square + tiny
    assert f"cached VAE latents of {len(PHOTO_SHAPES)} images" in r.stderr  # one latent per image, of its own size
    assert "aspect-ratio buckets" in (out / "README.md").read_text()
    sd, _ = read_lora(out / WEIGHTS)
    assert sd and all(torch.isfinite(v).all() for v in sd.values())


def test_square_folder_is_bit_identical_with_or_without_buckets(tiny_model, tmp_path):
    data = make_images(tmp_path / "d", n=3)
    flags = dict(train_data_dir=data, max_train_steps=3, center_crop=True)
    run(T2I, fast_flags(tiny_model, tmp_path / "b" / "o", **flags))
    r = run(T2I, fast_flags(tiny_model, tmp_path / "s" / "o", no_bucket=True, **flags))  # same name: same header
    assert "square 32x32 crops (--no_bucket)" in r.stderr
    assert (tmp_path / "b/o" / WEIGHTS).read_bytes() == (tmp_path / "s/o" / WEIGHTS).read_bytes()


def test_resume_with_buckets_random_crops_and_caption_ops_is_exact(tiny_model, tmp_path):
    """The must-show of issue #14: buckets, random crop and flip, caption shuffling and dropout — 6 steps in one
    run equal 3 steps + resume for 3 more."""
    data = photo_folder(tmp_path / "photos")
    for i, txt in enumerate(sorted(data.glob("*.txt"))):
        txt.write_text(f"sks picture, {txt.stem}, colour {i}, white frame, centred disc")
    common = dict(train_data_dir=data, resolution=64, checkpointing_steps=3, random_flip=True, shuffle_caption=True,
                  keep_tokens=1, caption_dropout_rate=0.3, caption_tag_dropout_rate=0.2)
    run(T2I, fast_flags(tiny_model, tmp_path / "full", max_train_steps=6, **common))
    part = tmp_path / "part"
    run(T2I, fast_flags(tiny_model, part, max_train_steps=3, **common))
    r = run(T2I, fast_flags(tiny_model, part, max_train_steps=6, resume_from_checkpoint="latest", **common))
    assert "resumed from" in r.stderr and "not cached: --random_flip" in r.stderr and "caption shuffling" in r.stderr
    full, _ = read_lora(tmp_path / "full" / WEIGHTS)
    resumed, _ = read_lora(part / WEIGHTS)
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6


def test_two_processes_with_buckets_write_one_lora(tiny_model, tmp_path):
    data = photo_folder(tmp_path / "photos")
    out = tmp_path / "o"
    cmd = accelerate_launch(T2I, fast_flags(tiny_model, out, train_data_dir=data, resolution=64, max_train_steps=3))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 procs" in r.stderr and r.stderr.count("aspect-ratio buckets") == 1
    assert r.stderr.count("saved " + str(out / WEIGHTS)) == 1
    assert sorted(p.name for p in out.iterdir() if p.name[0] != ".") == ["README.md", "o.safetensors", WEIGHTS,
                                                                  "sdlora-config.toml"]


def test_dreambooth_portrait_photos_with_square_class_images(tiny_model, tmp_path):
    """Instance photos in portrait/landscape buckets, class images square: each micro-batch runs the UNet once
    per bucket, and prior preservation still weighs both halves."""
    photos = photo_folder(tmp_path / "photos")
    for p in photos.glob("*.txt"):
        p.unlink()
    out = tmp_path / "o"
    r = run(DREAMBOOTH, fast_flags(tiny_model, out, instance_data_dir=photos, instance_prompt="a sks picture",
                                   with_prior_preservation=True, class_prompt="a picture", num_class_images=2,
                                   class_data_dir=tmp_path / "class", resolution=64, max_train_steps=3))
    table = re.search(r"aspect-ratio buckets \(w x h: images\): (.*?);", r.stderr).group(1)
    assert "48x72" in table and "64x64" in table, table  # portrait photos beside the square class images
    sd, _ = read_lora(out / WEIGHTS)
    assert sd and all(torch.isfinite(v).all() for v in sd.values())


def test_no_upscale_skips_an_image_smaller_than_a_step_by_name(tmp_path, caplog):
    from sdlora.data.sources import rows_from_folder
    from sdlora.data.trainset import TrainSet

    data = photo_folder(tmp_path / "photos")  # includes a 20x20 image
    rows = rows_from_folder(data)
    with caplog.at_level("WARNING"):
        ts = TrainSet(rows, [[i] for i in range(len(rows))], [0] * len(rows), 64, True, False,
                      Bucketing(64, step=32, no_upscale=True))
    tiny = next(i for i, r in enumerate(rows) if r.image.name == "tiny.png")
    assert len(ts) == len(rows) - 1 and tiny not in ts.used_rows()
    assert "skipping" in caplog.text and "tiny.png: 20x20 is smaller than one --bucket_reso_steps (32)" in caplog.text
    with pytest.raises(UserError, match="no image is left"):
        TrainSet(rows[tiny:tiny + 1], [[0]], [0], 64, True, False, Bucketing(64, step=32, no_upscale=True))


def test_kohya_flag_names_carry_over(tiny_model, tmp_path, capsys, no_model_loads):
    data = make_images(tmp_path / "d", n=2)
    args = t2i.parse_args(fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, flip_aug=True, alpha_mask=True,
                                     random_crop=True, enable_bucket=True))
    assert args.random_flip and args.masked_loss and not args.center_crop and not args.no_bucket
    line = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, random_crop=True,
                                                center_crop=True))
    assert "--random_crop and --center_crop contradict" in line
    line = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, no_bucket=True,
                                                enable_bucket=True))
    assert "--no_bucket and --enable_bucket contradict" in line
