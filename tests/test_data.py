"""Reading images and captions: odd modes, EXIF, bad files, imagefolder and kohya layouts."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.data.images import read_image
from sdlora.data.sources import rows_from_datasets, rows_from_folder, scan_folder
from sdlora.data.trainset import Examples, StreamSampler, TrainSet, collate
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

    from sdlora.data.sources import Row

    folder = make_images(tmp_path, n=2)
    rows = [Row(folder / "img0.png", "inst", "a", (32, 32)), Row(folder / "img1.png", "cls", "b", (32, 32))]
    data = Examples(TrainSet(rows, [[0, 1], [0, 1]], [0, 1], 32, True, False), seed=0, pixels=True)
    batch = collate([data[(0, 0)], data[(0, 1)]])
    assert batch["groups"].tolist() == [0, 0, 1, 1] and batch["captions"] == ["inst", "inst", "cls", "cls"]
    assert batch["chunks"] == [(0, 4)] and batch["pixel_values"][0].shape == (4, 3, 32, 32)
    assert batch["pixel_values"][0].min() >= -1 and batch["pixel_values"][0].max() <= 1


def test_repeats_of_a_row_get_their_own_augmentation(tmp_path):
    from sdlora.data.sources import Row

    img = Image.new("RGB", (32, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 8, 32))  # blue stripe on the left: flipping shows
    img.save(tmp_path / "a.png")
    data = Examples(TrainSet([Row(tmp_path / "a.png", "x", "a", (32, 32))], [[0]] * 16, [0], 32, True, True),
                    seed=0, pixels=True)
    flips = {bool(torch.equal(data[(0, i)]["pixel_values"][0], data[(0, 0)]["pixel_values"][0])) for i in range(16)}
    assert flips == {True, False}  # some repeats flipped, some not, within one epoch
    again = Examples(TrainSet(data.data.rows, data.data.examples, data.data.groups, 32, True, True), seed=0, pixels=True)
    assert torch.equal(again[(3, 5)]["pixel_values"][0], data[(3, 5)]["pixel_values"][0])  # still seeded


# ---------------------------------------------------------------- issue #11: bad data named, never a traceback

def _img(path, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("name,data,line", [
    ("a.txt", "caf\xe9 au lait".encode("latin-1"), 1),
    ("metadata.jsonl", b'{"file_name": "a.png", "text": "ok"}\n{"file_name": "a.png", "text": "caf\xe9"}\n', 2),
    ("metadata.csv", b"file_name,text\na.png,ok\n\na.png,caf\xe9\n", 4),
    ("metadata.csv", "file_name,text\na.png,ok\n".encode("utf-16"), 1),
])
def test_non_utf8_text_is_named_with_its_line(tmp_path, name, data, line):
    _img(tmp_path / "a.png")
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError) as e:
        rows_from_folder(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / name}, line {line}: not UTF-8") and "save it as UTF-8" in str(e.value)


def test_utf8_bom_just_works(tmp_path):
    _img(tmp_path / "a.png")
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.txt").write_bytes(bom + "caf\xe9".encode())
    assert rows_from_folder(tmp_path)[0].caption == "caf\xe9"
    (tmp_path / "metadata.jsonl").write_bytes(bom + b'{"file_name": "a.png", "text": "one"}\n')
    assert rows_from_folder(tmp_path)[0].caption == "one"
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_bytes(bom + b"file_name,text\r\na.png,two\r\n")
    assert rows_from_folder(tmp_path)[0].caption == "two"


@pytest.mark.parametrize("row", [{"text": "x"}, {"file_name": 5, "text": "x"}, {"file_name": None, "text": "x"},
                                 {"file_name": ["a.png"], "text": "x"}, {"file_name": {"p": "a.png"}, "text": "x"},
                                 {"file_name": "", "text": "x"}])
def test_row_without_a_file_name_string_is_named(tmp_path, row):
    _img(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=r"metadata.jsonl, line 2: 'file_name' should be the image's path") as e:
        rows_from_folder(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("cap", [42, 1.5, True, {"en": "a dog"}, ["a dog", 3], [["nested"]]])
def test_caption_that_is_not_text_is_named(tmp_path, cap):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "ok"}) + "\n\n"
                                             + json.dumps({"file_name": "b.png", "text": cap}) + "\n")
    with pytest.raises(UserError, match=r"metadata.jsonl, line 3: caption 'text' should be text .*put it in quotes"):
        rows_from_folder(tmp_path)


def test_caption_lists_and_line_separators_in_captions_are_valid(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    rows = [{"file_name": "a.png", "text": ["a dog", "a puppy"]}, {"file_name": "b.png", "text": "one\u2028two\x85"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    assert [r.caption for r in rows_from_folder(tmp_path)] == [["a dog", "a puppy"], "one\u2028two\x85"]


def test_datasets_caption_of_wrong_type_names_the_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = [Image.new("RGB", (8, 8)) for _ in range(2)]
    datasets.Dataset.from_dict({"image": imgs, "text": [7, 8]}).save_to_disk(str(tmp_path / "ints"))
    with pytest.raises(UserError, match=r"ints: row 0: --caption_column 'text' holds 7; it should hold text"):
        rows_from_datasets(str(tmp_path / "ints"), None, "image", "text", None)
    datasets.Dataset.from_dict({"image": imgs, "text": ["a", None]}).save_to_disk(str(tmp_path / "none"))
    rows = rows_from_datasets(str(tmp_path / "none"), None, "image", "text", None, allow_empty_captions=True)
    assert [r.caption for r in rows] == ["a", ""]  # allowed empty captions, as the flag says


@pytest.mark.parametrize("text,line,expect", [
    ("file_name,text\na.png,a red, shiny ball\n", 2, "more fields than the header's 2; put text that contains commas"),
    ('file_name,text\na.png,"' + "x" * 200_000 + '"\n', 2, "malformed CSV (field larger than field limit"),
])
def test_malformed_csv_is_named(tmp_path, text, line, expect):
    _img(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text(text)
    with pytest.raises(UserError, match=rf"metadata.csv, line {line}: " + expect.replace("(", r"\(")):
        rows_from_folder(tmp_path)


@pytest.mark.parametrize("line", ["[" * 100_000, '{"file_name": "a.png", "text": ' + "1" * 5000 + "}"])
def test_jsonl_too_deep_or_too_long_numbers(tmp_path, line):
    _img(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n' + line)
    with pytest.raises(UserError, match=r"metadata.jsonl, line 2: malformed JSON \(a number too long or nesting"):
        rows_from_folder(tmp_path)


def test_links_out_of_the_folder_loops_and_broken_links_are_named(tmp_path, caplog):
    from sdlora.data import class_images as dreambooth
    from sdlora.data.sources import rows_from_images

    outside = _img(tmp_path / "outside" / "secret.png")
    (tmp_path / "outside" / "secret.txt").write_text("outside caption")
    d = tmp_path / "d"
    _img(d / "a.png")
    (d / "a.txt").write_text("a")
    (d / "alias.png").symlink_to("a.png")  # inside: still used
    (d / "alias.txt").write_text("alias")
    (d / "out.png").symlink_to(outside)
    (d / "out.txt").write_text("out")
    (d / "loop.png").symlink_to("loop.png")
    (d / "gone.png").symlink_to("nothing-here.png")
    (d / "ext").symlink_to(tmp_path / "outside", target_is_directory=True)
    (d / "sub").mkdir()
    (d / "sub" / "up").symlink_to("..", target_is_directory=True)  # a loop rglob must not walk
    with caplog.at_level("WARNING"):
        rows = rows_from_folder(d)
    assert [(r.name, r.caption) for r in rows] == [(str(d / "a.png"), "a"), (str(d / "alias.png"), "alias")]
    for name, why in [("out.png", "symlink to a file outside --train_data_dir; copy it in"), ("loop.png", "symlink loop"),
                      ("gone.png", "broken symlink"), ("ext", "symlink to a folder outside --train_data_dir")]:
        assert caplog.text.count(str(d / name)) == 1 and why in caplog.text, name
    assert "secret" not in caplog.text and str(d / "sub") not in caplog.text  # not walked into, not complained about
    # DreamBooth's listing agrees: a link out of the folder is neither a row nor a class image already there
    assert [r.name for r in rows_from_images(d, "p", "--instance_data_dir")] == [str(d / "a.png"), str(d / "alias.png")]
    assert dreambooth.existing_images(d) == [d / "a.png", d / "alias.png"]


def test_links_out_of_the_folder_for_captions_and_metadata(tmp_path):
    (tmp_path / "elsewhere.txt").write_text("caption from elsewhere")
    d = tmp_path / "d"
    _img(d / "a.png")
    (d / "a.txt").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(UserError, match=r"a.txt: symlink to a file outside --train_data_dir"):
        rows_from_folder(d)
    (d / "a.txt").unlink()
    (d / "metadata.jsonl").symlink_to(d / "missing.jsonl")
    with pytest.raises(UserError, match=r"metadata.jsonl: broken symlink"):
        rows_from_folder(d)


def test_metadata_rows_for_missing_or_outside_files_are_named_and_never_read(tmp_path, caplog):
    outside = _img(tmp_path / "outside.png")
    d = tmp_path / "d"
    _img(d / "a.png")
    _img(d / "sub" / "b.png")
    (d / "notes.txt").write_text("x")
    lines = [{"file_name": "a.png", "text": "a"}, {"file_name": "gone.png", "text": "g"},
             {"file_name": "../outside.png", "text": "o"}, {"file_name": str(outside), "text": "o"},
             {"file_name": "sub\\b.png", "text": "w"}, {"file_name": "notes.txt", "text": "n"},
             {"file_name": str(d / "sub" / "b.png"), "text": "b"}]  # absolute but inside: fine
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with caplog.at_level("WARNING"):
        rows = rows_from_folder(d)
    assert [(r.name, r.caption) for r in rows] == [(str(d / "a.png"), "a"), (str(d / "sub" / "b.png"), "b")]
    meta = d / "metadata.jsonl"
    for n, why in [(2, "no file 'gone.png'"), (3, "'../outside.png' is outside --train_data_dir"),
                   (4, f"'{outside}' is outside --train_data_dir"), (5, "(use / between folders)"),
                   (6, "'notes.txt' is not an image")]:
        assert caplog.text.count(f"skipping {meta}, line {n}: ") == 1 and why in caplog.text, n
    assert "line 1:" not in caplog.text and "line 7:" not in caplog.text


def test_caption_or_image_that_is_not_a_regular_file(tmp_path, caplog):
    import os
    import threading

    _img(tmp_path / "a.png")
    os.mkfifo(tmp_path / "fifo.png")  # opening it would block forever
    (tmp_path / "a.txt").mkdir()
    with pytest.raises(UserError, match=r"a.txt: a folder, not a text file"):
        rows_from_folder(tmp_path)
    (tmp_path / "a.txt").rmdir()
    os.mkfifo(tmp_path / "a.txt")
    caplog.clear()
    out = []

    def read():
        try:
            rows_from_folder(tmp_path)
        except Exception as e:  # noqa: BLE001 - the test checks which
            out.append(e)
    with caplog.at_level("WARNING"):
        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(10)
    if t.is_alive():  # unblock the reader before failing
        os.close(os.open(tmp_path / "a.txt", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO caption blocked")
    assert isinstance(out[0], UserError) and "a.txt: not a regular file" in str(out[0])
    assert caplog.text.count("fifo.png: not a regular file") == 1


def test_image_that_breaks_the_decoder_is_skipped(tmp_path, caplog):
    import io

    b = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(b, "PNG")
    data = bytearray(b.getvalue())
    i = data.index(b"IDAT") - 4
    data[i:i + 4] = b"\0\0\0\0"  # IDAT claims 0 bytes: PIL raises SyntaxError, not OSError
    (tmp_path / "broken.png").write_bytes(bytes(data))
    _img(tmp_path / "a.png")
    with caplog.at_level("WARNING"):
        good, skipped = scan_folder(tmp_path)
    assert list(good) == [tmp_path / "a.png"] and skipped[0][0] == tmp_path / "broken.png"
    assert "unreadable image (broken PNG file" in caplog.text


def test_caption_file_too_long_is_refused_before_it_is_read(tmp_path):
    """A 50 MB one-word caption (a wrong file) is one line naming it, not gigabytes in the tokenizer; the file is
    never read into memory. A long but real caption (under 64 KiB) still loads."""
    import tracemalloc

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("tag, " * 12000)  # 60,000 bytes: kohya-style tag lists can be long
    assert rows_from_folder(tmp_path)[0].caption.startswith("tag, tag")
    with open(tmp_path / "a.txt", "wb") as f:
        f.write(b"a" * 1000)
        f.truncate(50 * 2**20)  # sparse: 50 MB without writing it
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as e:
            rows_from_folder(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(f"{tmp_path / 'a.txt'}: 52,428,800 bytes, too long for a caption"), e.value
    assert peak < 5 * 2**20, peak


@pytest.mark.parametrize("meta,text,line", [
    ("metadata.jsonl", '{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png", "text": "%s"}\n', 2),
    ("metadata.csv", "file_name,text\na.png,x\nb.png,%s\n", 3),
])
def test_metadata_caption_too_long_names_its_line(tmp_path, meta, text, line):
    for n in "ab":
        Image.new("RGB", (8, 8)).save(tmp_path / f"{n}.png")
    (tmp_path / meta).write_text(text % ("a" * 100_000))
    with pytest.raises(UserError, match=rf"^{tmp_path / meta}, line {line}: 100,000 characters, too long for a caption"):
        rows_from_folder(tmp_path)


@pytest.mark.parametrize("meta,text,expect", [
    ("metadata.jsonl", '{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png", "text": "y"}\n'
                       '{"file_name": "./a.png", "text": "z"}\n', r"line 3: './a.png' already has a row \(line 1\)"),
    ("metadata.csv", "file_name,text\nb.png,y\nb.png,y\n", r"line 3: 'b.png' already has a row \(line 2\)"),
])
def test_duplicate_file_name_rows_are_an_error(tmp_path, meta, text, expect):
    """Each image is one row: a second row would train it twice per epoch without a word."""
    for n in "ab":
        Image.new("RGB", (8, 8)).save(tmp_path / f"{n}.png")
    (tmp_path / meta).write_text(text)
    with pytest.raises(UserError, match=rf"^{tmp_path / meta}, {expect}; keep one row per image"):
        rows_from_folder(tmp_path)


def test_both_metadata_files_is_an_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "from jsonl"}\n')
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,from csv\n")
    with pytest.raises(UserError, match=rf"^{tmp_path}: both metadata.jsonl and metadata.csv are there; keep one"):
        rows_from_folder(tmp_path)
