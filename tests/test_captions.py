"""kohya's data set conventions: N_name repeat folders and --caption_extension."""
from types import SimpleNamespace

import pytest
from helpers import fast_flags, recipe_error
from PIL import Image

import train_dreambooth_lora as db
import train_text_to_image_lora as t2i
from sdlora.data.sources import rows_from_folder, scan_folder
from sdlora.errors import UserError


def _img(path, colour=(200, 30, 30), caption=None, ext=".txt"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    if caption is not None:
        path.with_suffix(ext).write_text(caption)
    return path


# ---------------------------------------------------------------- folders: repeats, folder captions, extension

def _args(tmp_path, data, **over):
    """Text-to-image flags for make_recipe, which reads only data flags (the model is never looked at)."""
    return t2i.parse_args(fast_flags("unused", tmp_path / "o", train_data_dir=data, **over))


CONFIG = SimpleNamespace(resolution=32, center_crop=True, random_flip=False)


def test_repeat_folders_and_folder_name_captions(tmp_path, caplog):
    d = tmp_path / "d"
    _img(d / "5_sks dog" / "a.png", caption="sks dog, sitting")
    _img(d / "5_sks dog" / "b.png")  # no caption file: the folder's name is its caption
    _img(d / "1_other" / "c.png", caption="something else")
    _img(d / "root.png", caption="at the top")
    _img(d / "plain" / "e.png", caption="in a plain folder")
    _img(d / "-1_x" / "f.png", caption="not a repeat folder")
    with caplog.at_level("INFO"):
        rows = rows_from_folder(d)
    got = {str(r.image.relative_to(d)): (r.caption, r.repeats) for r in rows}
    assert got == {"5_sks dog/a.png": ("sks dog, sitting", 5), "5_sks dog/b.png": ("sks dog", 5),
                   "1_other/c.png": ("something else", 1), "root.png": ("at the top", 1),
                   "plain/e.png": ("in a plain folder", 1), "-1_x/f.png": ("not a repeat folder", 1)}
    assert f"{d / '5_sks dog'}: 2 images, each 5 times per epoch" in caplog.text
    recipe = t2i.make_recipe(_args(tmp_path, d), CONFIG)
    assert len(recipe.data.rows) == 6 and len(recipe.data) == 5 * 2 + 4
    # --max_train_samples cuts rows, before they repeat: sorted, that is -1_x/f, 1_other/c, 5_sks dog/a
    recipe = t2i.make_recipe(_args(tmp_path, d, max_train_samples=3), CONFIG)
    assert len(recipe.data.rows) == 3 and len(recipe.data) == 1 + 1 + 5
    # an image outside an N_name folder still needs a caption
    (d / "plain" / "e.txt").unlink()
    with pytest.raises(UserError, match=r"e.png: no caption \(no e.txt"):
        rows_from_folder(d)


def test_dreambooth_repeat_folders_times_repeats(tmp_path):
    inst = tmp_path / "inst"
    _img(inst / "3_sks dog" / "a.png")
    _img(inst / "b.png")
    args = db.parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", str(inst),
                          "--instance_prompt", "a photo of sks dog", "--repeats", "2"])
    data = db.make_recipe(args, CONFIG).data
    assert [r.caption for r in data.rows] == ["a photo of sks dog"] * 2  # the prompt, not the folder name
    assert data.examples == [[0], [0], [0], [1]] * 2


@pytest.mark.parametrize("ext", [".caption", "caption"])
def test_caption_extension(tmp_path, caplog, ext):
    d = tmp_path / "d"
    _img(d / "a.png", caption="from the .caption file", ext=".caption")
    (d / "a.txt").write_text("from the .txt file")
    _img(d / "b.png", caption="b's caption", ext=".caption")
    with caplog.at_level("WARNING"):
        rows = rows_from_folder(d, caption_extension=ext)
    assert [r.caption for r in rows] == ["from the .caption file", "b's caption"] and not caplog.text
    (d / "b.caption").unlink()
    (d / "b.txt").write_text("not read")
    with pytest.raises(UserError, match=r"b.png: no caption \(no b.caption and no metadata.jsonl\)"):
        rows_from_folder(d, caption_extension=ext)


def test_custom_caption_extension_is_not_reported_as_a_bad_image(tmp_path, caplog):
    d = tmp_path / "d"
    _img(d / "a.png", caption="tags", ext=".tags")
    with caplog.at_level("WARNING"):
        good, skipped = scan_folder(d, caption_extension=".tags")
    assert list(good) == [d / "a.png"] and skipped == [] and not caplog.text
    assert [r.caption for r in rows_from_folder(d, caption_extension="tags")] == ["tags"]


# ---------------------------------------------------------------- bad input: one line, before any model loads

@pytest.fixture
def kohya_data(tmp_path):
    d = tmp_path / "d"
    _img(d / "2_sks dog" / "a.png", caption="sks dog, sitting, red collar")
    _img(d / "2_sks dog" / "b.png", caption="sks dog, running")
    return d


def test_bad_caption_extension(tiny_model, tmp_path, capsys, no_model_loads, kohya_data):
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=kohya_data,
                                              caption_extension=".png"))
    assert "--caption_extension '.png': not a caption file extension" in msg, msg


def test_zero_repeat_folder(tiny_model, tmp_path, capsys, no_model_loads, kohya_data):
    _img(kohya_data / "0_x" / "c.png", caption="never trained")
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=kohya_data))
    assert f"--train_data_dir {kohya_data / '0_x'}: a 0_ folder's images would never be trained; rename it 1_x" in msg
    msg = recipe_error(capsys, db, fast_flags(tiny_model, tmp_path / "o", instance_data_dir=kohya_data,
                                              instance_prompt="a photo of sks dog"))
    assert f"--instance_data_dir {kohya_data / '0_x'}: a 0_ folder's" in msg
