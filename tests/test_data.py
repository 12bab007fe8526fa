"""Reading images and captions: odd modes, EXIF, bad files, imagefolder and kohya layouts."""
import json

import numpy as np
import torch
import pytest
from PIL import Image

from sdlora.data import StreamSampler, TrainSet, collate, read_image, rows_from_datasets, rows_from_folder, scan_folder
from sdlora.errors import UserError


def test_any_mode_becomes_rgb(tmp_path):
    cases = {
        "l.png": Image.new("L", (8, 8), 200),
        "rgba.png": Image.new("RGBA", (8, 8), (255, 0, 0, 0)),  # fully transparent -> white
        "cmyk.jpg": Image.new("CMYK", (8, 8), (0, 255, 255, 0)),  # red
        "p.png": Image.new("P", (8, 8), 3),
        "i16.png": Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)),
        "web.webp": Image.new("RGB", (8, 8), (0, 0, 255)),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
    out = {n: read_image(tmp_path / n) for n in cases}
    assert all(im.mode == "RGB" and im.size == (8, 8) for im in out.values())
    assert out["rgba.png"].getpixel((0, 0)) == (255, 255, 255)
    r, g, b = out["cmyk.jpg"].getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60
    assert out["i16.png"].getpixel((0, 0)) == (255, 255, 255)  # 16-bit white stays white, not clipped garbage
    assert out["web.webp"].getpixel((4, 4))[2] > 200


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (16, 8), (255, 0, 0))
    img.paste((0, 255, 0), (0, 0, 8, 8))  # left half green
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "r.jpg")
    assert out.size == (8, 16)
    assert out.getpixel((4, 2))[1] > 200  # the green half is now on top
    good, _ = scan_folder(tmp_path)
    assert good[tmp_path / "r.jpg"] == (8, 16)


def test_bad_files_are_skipped_and_named_once(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("a caption")
    (tmp_path / "notes.pdf").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    full = (tmp_path / "ok.png").read_bytes()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "trunc.jpg")
    (tmp_path / "trunc.jpg").write_bytes((tmp_path / "trunc.jpg").read_bytes()[:200])
    with caplog.at_level("WARNING"):
        good, skipped = scan_folder(tmp_path)
    assert list(good) == [tmp_path / "ok.png"]
    reasons = {p.name: r for p, r in skipped}
    assert reasons["notes.pdf"] == "not an image" and reasons["empty.png"] == "empty file"
    assert "trunc.jpg" in reasons
    for name in ("notes.pdf", "empty.png", "trunc.jpg"):
        assert caplog.text.count(name) == 1
    assert full


def test_no_usable_image_names_folder(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match=str(tmp_path)):
        scan_folder(tmp_path)


def test_imagefolder_jsonl_and_csv(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "one"}\n\n{"file_name": "b.png", "text": "two"}\n')
    assert [r.caption for r in rows_from_folder(tmp_path)] == ["one", "two"]
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,prompt\na.png,uno\nb.png,dos\n")
    assert [r.caption for r in rows_from_folder(tmp_path, caption_column="prompt")] == ["uno", "dos"]


def test_malformed_jsonl_line_is_named(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "one"}\n{"file_name": "b.png", \n')
    with pytest.raises(UserError, match=r"metadata.jsonl, line 2: malformed JSON"):
        rows_from_folder(tmp_path)


def test_missing_caption_column_lists_columns(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "x"}) + "\n")
    with pytest.raises(UserError, match=r"caption column 'text' not found \(found: caption, file_name\)"):
        rows_from_folder(tmp_path)


def test_image_without_caption(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("has one")
    with pytest.raises(UserError, match=r"b.png: no caption"):
        rows_from_folder(tmp_path)
    rows = rows_from_folder(tmp_path, allow_empty_captions=True)
    assert [r.caption for r in rows] == ["has one", ""]


def test_datasets_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": imgs, "text": ["a", "b", "c"]}, features=datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    rows = rows_from_datasets(str(tmp_path / "ds"), None, "image", "text", None)
    assert [r.caption for r in rows] == ["a", "b", "c"]
    assert read_image(rows[2].image).getpixel((0, 0)) == (80, 0, 0)
    with pytest.raises(UserError, match=r"--caption_column 'caption' not found \(found: image, text\)"):
        rows_from_datasets(str(tmp_path / "ds"), None, "image", "caption", None)


def test_stream_is_seeded_sharded_and_resumable():
    s0, s1 = StreamSampler(10, 3, seed=7, rank=0, world=2), StreamSampler(10, 3, seed=7, rank=1, world=2)
    epoch0 = [i for m in range(s0.batches_per_epoch) for _, i in s0.batch(m) + s1.batch(m)]
    assert sorted(set(epoch0)) == list(range(10))  # every row seen once per epoch (plus wrap padding)
    assert not set(i for _, i in s0.batch(0)) & set(i for _, i in s1.batch(0))
    resumed = StreamSampler(10, 3, seed=7, rank=0, world=2, start=5)
    assert next(iter(resumed)) == s0.batch(5)


def test_collate_puts_main_group_first(tmp_path):
    from conftest import make_images

    from sdlora.data import Row

    folder = make_images(tmp_path, n=2)
    rows = [Row(folder / "img0.png", "inst", "a", (32, 32)), Row(folder / "img1.png", "cls", "b", (32, 32))]
    data = TrainSet(rows, [[0, 1], [0, 1]], [0, 1], 32, True, False, 0)
    batch = collate([data[(0, 0)], data[(0, 1)]])
    assert batch["groups"].tolist() == [0, 0, 1, 1] and batch["captions"] == ["inst", "inst", "cls", "cls"]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


def test_repeats_of_a_row_get_their_own_augmentation(tmp_path):
    from sdlora.data import Row

    img = Image.new("RGB", (32, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 8, 32))  # blue stripe on the left: flipping shows
    img.save(tmp_path / "a.png")
    data = TrainSet([Row(tmp_path / "a.png", "x", "a", (32, 32))], [[0]] * 16, [0], 32, True, True, seed=0)
    flips = {bool(torch.equal(data[(0, i)]["pixel_values"][0], data[(0, 0)]["pixel_values"][0])) for i in range(16)}
    assert flips == {True, False}  # some repeats flipped, some not, within one epoch
    again = TrainSet(data.rows, data.examples, data.groups, 32, True, True, seed=0)
    assert torch.equal(again[(3, 5)]["pixel_values"][0], data[(3, 5)]["pixel_values"][0])  # still seeded
