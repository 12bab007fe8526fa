"""kohya's data set conventions: N_name repeat folders, --caption_extension, and the caption operations
(shuffle around a fixed prefix, whole-caption and tag dropout), seeded so resume stays exact."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import T2I, fast_flags, read_lora, recipe_error, run
from PIL import Image

from sdlora.recipes import dreambooth as db
from sdlora.recipes import text_to_image as t2i
from sdlora.data.buckets import Bucketing
from sdlora.data.captions import CaptionOps
from sdlora.data.sources import Row, rows_from_folder, scan_folder
from sdlora.data.trainset import TrainSet
from sdlora.errors import UserError
from sdlora.training.caches import all_captions, plan

CAPTION = "sks dog, red collar, on grass, sunny, outdoors"
TAGS = [t.strip() for t in CAPTION.split(",")]


def _rng(seed):
    return np.random.default_rng(seed)


def _img(path, colour=(200, 30, 30), caption=None, ext=".txt"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    if caption is not None:
        path.with_suffix(ext).write_text(caption)
    return path


# ---------------------------------------------------------------- CaptionOps, as kohya's process_caption

def test_shuffle_keeps_the_first_keep_tokens_tags_in_place():
    ops = CaptionOps(shuffle=True, keep_tokens=2)
    outs = [ops.apply(CAPTION, _rng(s)).split(", ") for s in range(30)]
    assert all(o[:2] == TAGS[:2] and sorted(o[2:]) == sorted(TAGS[2:]) for o in outs)
    assert len({tuple(o) for o in outs}) > 3  # the rest really is shuffled


def test_keep_tokens_separator_fixes_prefix_and_suffix_and_overrides_keep_tokens():
    ops = CaptionOps(shuffle=True, keep_tokens=3, keep_tokens_separator="|||")
    outs = [ops.apply("sks, dog ||| a, b, c, d ||| best quality", _rng(s)).split(", ") for s in range(30)]
    assert all(o[:2] == ["sks", "dog"] and o[-1] == "best quality" and sorted(o[2:-1]) == ["a", "b", "c", "d"]
               for o in outs)
    assert len({tuple(o[2:-1]) for o in outs}) > 3  # "a" is not held by --keep_tokens 3
    # a caption without the separator falls back to --keep_tokens
    assert all(ops.apply(CAPTION, _rng(s)).split(", ")[:3] == TAGS[:3] for s in range(10))


def test_caption_separator():
    ops = CaptionOps(shuffle=True, keep_tokens=1, separator=";")
    outs = {ops.apply("sks dog; red, shiny; grass", _rng(s)) for s in range(20)}
    assert outs == {"sks dog, red, shiny, grass", "sks dog, grass, red, shiny"}  # "red, shiny" is one tag


def test_caption_dropout_and_tag_dropout():
    assert {CaptionOps(dropout_rate=1.0).apply(CAPTION, _rng(s)) for s in range(10)} == {""}
    half = [CaptionOps(dropout_rate=0.5).apply(CAPTION, _rng(s)) for s in range(200)]
    assert set(half) == {"", CAPTION} and 60 < half.count("") < 140
    ops = CaptionOps(tag_dropout_rate=0.5, keep_tokens=1)
    outs = [ops.apply(CAPTION, _rng(s)).split(", ") for s in range(200)]
    assert all(o[0] == "sks dog" and all(t in TAGS[1:] for t in o[1:]) for o in outs)  # order kept, no shuffle
    kept = sum(len(o) - 1 for o in outs) / (200 * 4)
    assert 0.35 < kept < 0.65
    assert {tuple(CaptionOps(tag_dropout_rate=0.999).apply(CAPTION, _rng(s)).split(", ")) for s in range(5)} == {("",)}


def test_same_generator_state_same_caption():
    ops = CaptionOps(shuffle=True, keep_tokens=1, dropout_rate=0.2, tag_dropout_rate=0.3)
    assert [ops.apply(CAPTION, _rng(s)) for s in range(50)] == [ops.apply(CAPTION, _rng(s)) for s in range(50)]
    assert len({ops.apply(CAPTION, _rng(s)) for s in range(50)}) > 10


@pytest.mark.parametrize("ops,active", [(CaptionOps(), False), (CaptionOps(keep_tokens=2, separator=";"), False),
                                        (CaptionOps(dropout_rate=0.1), True), (CaptionOps(shuffle=True), True)])
def test_inactive_ops_draw_nothing_and_change_nothing(ops, active):
    rng = _rng(0)
    before = rng.bit_generator.state
    out = ops.apply("a,b ,  c", rng)
    assert ops.active == active and (rng.bit_generator.state != before) == active
    if not active:
        assert out == "a,b ,  c"


def test_only_main_group_rows_get_caption_ops(tmp_path):
    rows = [Row(tmp_path / "a.png", CAPTION, "a", (32, 32)), Row(tmp_path / "b.png", "a photo of a dog", "b", (32, 32))]
    data = TrainSet(rows, [[0, 1]] * 4, [0, 1], 32, True, False, captions=CaptionOps(dropout_rate=0.999))
    assert [data.caption(0, 0, 0, (i, 0)) for i in range(4)] == [""] * 4
    assert [data.caption(1, 0, 0, (i, 1)) for i in range(4)] == ["a photo of a dog"] * 4
    shuffled = TrainSet(rows, [[0]] * 8, [0, 1], 32, True, False, captions=CaptionOps(shuffle=True))
    caps = [shuffled.caption(0, 7, e, (i, 0)) for e in range(2) for i in range(8)]
    assert len(set(caps)) > 4 and caps == [shuffled.caption(0, 7, e, (i, 0)) for e in range(2) for i in range(8)]


def test_text_embeddings_cached_unless_captions_vary(tmp_path):
    config = SimpleNamespace(no_cache=False, pre_compute_text_embeddings=False, train_text_encoder=False,
                             cache_latents_to_disk=False)
    rows = [Row(tmp_path / "a.png", CAPTION, "a", (32, 32))]

    def data(ops):
        return TrainSet(rows, [[0]], [0], 32, True, False, captions=ops)
    assert plan(config, data(CaptionOps(shuffle=True))) == \
        (True, False, "caption shuffling/tag dropout changes captions every step")
    assert plan(config, data(CaptionOps(tag_dropout_rate=0.1)))[1] is False
    assert plan(config, data(CaptionOps(dropout_rate=0.1))) == (True, True, "")
    assert sorted(all_captions(data(CaptionOps(dropout_rate=0.1)))) == ["", CAPTION]
    assert all_captions(data(None)) == [CAPTION]


# ---------------------------------------------------------------- folders: repeats, folder captions, extension

def _args(tmp_path, data, **over):
    """Text-to-image flags for make_recipe, which reads only data flags (the model is never looked at)."""
    return t2i.parse_args(fast_flags("unused", tmp_path / "o", train_data_dir=data, **over))


CONFIG = SimpleNamespace(resolution=32, center_crop=True, random_flip=False, bucketing=Bucketing(32, step=8),
                         validation_split=None, validation_data_dir=None, masked_loss=False, mask_dir=None)


def test_repeat_folders_and_folder_name_captions(tmp_path, caplog):
    d = tmp_path / "d"
    _img(d / "5_sks dog" / "a.png", caption="sks dog, sitting")
    _img(d / "5_sks dog" / "b.png")  # no caption file: the folder's name is its caption
    _img(d / "1_other" / "c.png", caption="something else")
    _img(d / "root.png", caption="at the top")
    _img(d / "plain" / "e.png", caption="in a plain folder")
    with caplog.at_level("INFO"):
        rows = rows_from_folder(d)
    got = {str(r.image.relative_to(d)): (r.caption, r.repeats) for r in rows}
    assert got == {"5_sks dog/a.png": ("sks dog, sitting", 5), "5_sks dog/b.png": ("sks dog", 5),
                   "1_other/c.png": ("something else", 1), "root.png": ("at the top", 1),
                   "plain/e.png": ("in a plain folder", 1)}
    assert f"{d / '5_sks dog'}: 2 images, each 5 times per epoch" in caplog.text
    recipe = t2i.make_recipe(_args(tmp_path, d), CONFIG)
    assert len(recipe.data.rows) == 5 and len(recipe.data) == 5 * 2 + 3
    # --max_train_samples cuts rows, before they repeat: sorted, that is 1_other/c, 5_sks dog/a, 5_sks dog/b
    recipe = t2i.make_recipe(_args(tmp_path, d, max_train_samples=3), CONFIG)
    assert len(recipe.data.rows) == 3 and len(recipe.data) == 1 + 5 + 5
    # an image outside an N_name folder still needs a caption
    (d / "plain" / "e.txt").unlink()
    with pytest.raises(UserError, match=r"e.png: no caption \(no e.txt"):
        rows_from_folder(d)
    # N <= 0 is refused, a negative N too
    (d / "plain" / "e.txt").write_text("back")
    _img(d / "-1_x" / "f.png", caption="never trained")
    with pytest.raises(UserError, match=r"-1_x: a -1_ folder's images would never be trained; rename it 1_x"):
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


@pytest.mark.parametrize("over,expect", [
    ({"caption_dropout_rate": 1.0}, "--caption_dropout_rate must be in [0, 1) (got 1.0)"),
    ({"caption_tag_dropout_rate": -0.1}, "--caption_tag_dropout_rate must be in [0, 1) (got -0.1)"),
    ({"keep_tokens": -1}, "--keep_tokens must be >= 0 (got -1)"),
    ({"caption_separator": ""}, "--caption_separator is empty"),
    ({"caption_extension": ".png"}, "--caption_extension '.png': not a caption file extension"),
    ({"keep_tokens": 3, "shuffle_caption": True}, ("b.png: its caption \"sks dog, running\" has 2 tags (separated by "
                                                   "','), fewer than --keep_tokens 3; lower --keep_tokens or add tags")),
])
def test_bad_caption_flags(tiny_model, tmp_path, capsys, no_model_loads, kohya_data, over, expect):
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=kohya_data, **over))
    assert expect in msg, msg


def test_keep_tokens_check_spares_what_it_does_not_apply_to(tmp_path, kohya_data):
    # no shuffle or tag dropout: --keep_tokens does nothing, so nothing to check
    assert len(t2i.make_recipe(_args(tmp_path, kohya_data, keep_tokens=3, caption_dropout_rate=0.1), CONFIG).data) == 4
    # a caption with --keep_tokens_separator ignores --keep_tokens (kohya)
    (kohya_data / "2_sks dog" / "b.txt").write_text("sks dog ||| running")
    recipe = t2i.make_recipe(_args(tmp_path, kohya_data, keep_tokens=3, shuffle_caption=True,
                                   keep_tokens_separator="|||"), CONFIG)
    assert recipe.data.caption_ops == CaptionOps(shuffle=True, keep_tokens=3, keep_tokens_separator="|||")
    # no caption flag: no ops at all, so captions and the random stream are exactly what they always were
    assert t2i.make_recipe(_args(tmp_path, kohya_data), CONFIG).data.caption_ops is None


def test_zero_repeat_folder(tiny_model, tmp_path, capsys, no_model_loads, kohya_data):
    _img(kohya_data / "0_x" / "c.png", caption="never trained")
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=kohya_data))
    assert f"--train_data_dir {kohya_data / '0_x'}: a 0_ folder's images would never be trained; rename it 1_x" in msg
    msg = recipe_error(capsys, db, fast_flags(tiny_model, tmp_path / "o", instance_data_dir=kohya_data,
                                              instance_prompt="a photo of sks dog"))
    assert f"--instance_data_dir {kohya_data / '0_x'}: a 0_ folder's" in msg


def test_dreambooth_precomputed_prompt_cannot_shuffle(tiny_model, tmp_path, capsys, no_model_loads, kohya_data):
    msg = recipe_error(capsys, db, fast_flags(tiny_model, tmp_path / "o", instance_data_dir=kohya_data,
                                              instance_prompt="sks dog, sitting", pre_compute_text_embeddings=True,
                                              shuffle_caption=True))
    assert "--pre_compute_text_embeddings encodes each prompt once; it can't be used with --shuffle_caption" in msg


# ---------------------------------------------------------------- real runs

def test_caption_ops_train_and_resume_exactly(tiny_model, tmp_path, capsys, no_model_loads):
    """Shuffle + keep_tokens + caption and tag dropout on a repeat folder: it trains, says why text embeddings
    aren't cached, and 4 steps in one run equal 2 steps + resume for 2 more."""
    d = tmp_path / "d"
    _img(d / "5_sks square" / "a.png", (255, 0, 0), caption="sks square, red, small, centered, plain background")
    _img(d / "5_sks square" / "b.png", (0, 0, 255), caption="sks square, blue, large, on white, sharp")
    _img(d / "1_other" / "c.png", (0, 160, 0))  # captioned "other" by its folder
    flags = dict(train_data_dir=d, shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.3,
                 caption_tag_dropout_rate=0.2)
    r = run(T2I, fast_flags(tiny_model, tmp_path / "full", max_train_steps=4, **flags))
    assert "cached VAE latents of 3 images (not cached: caption shuffling/tag dropout changes captions every step)" \
        in r.stderr, r.stderr[-3000:]
    assert "5_sks square: 2 images, each 5 times per epoch" in r.stderr
    assert "3 rows" in r.stderr and (tmp_path / "full" / "full.safetensors").exists()
    card = (tmp_path / "full" / "README.md").read_text()
    assert "| caption operations | shuffled (first 1 kept), caption dropout 0.3, tag dropout 0.2 |" in card
    assert "| repeat folders | 2 images in N_name folders (11 examples per epoch) |" in card
    _, meta = read_lora(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    assert json.loads(meta["ss_dataset_dirs"]) == {"5_sks square": {"n_repeats": 5, "img_count": 2},
                                                   "d": {"n_repeats": 1, "img_count": 1}}  # kohya's header field
    part = tmp_path / "part"
    run(T2I, fast_flags(tiny_model, part, max_train_steps=2, checkpointing_steps=2, **flags))
    r = run(T2I, fast_flags(tiny_model, part, max_train_steps=4, checkpointing_steps=2,
                            resume_from_checkpoint="latest", **flags))
    assert "resumed from" in r.stderr
    full, _ = read_lora(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    resumed, _ = read_lora(part / "pytorch_lora_weights.safetensors")
    assert full.keys() == resumed.keys()
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6
    # the caption flags are part of what a resume is checked against
    flags["caption_dropout_rate"] = 0.1
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, part, max_train_steps=4, checkpointing_steps=2,
                                               resume_from_checkpoint="latest", **flags))
    assert "settings differ" in msg and '"dropout_rate": 0.3' in msg and '"dropout_rate": 0.1' in msg
