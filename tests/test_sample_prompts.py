"""--sample_prompts: kohya's prompt-file format, its errors before any model loads, when rounds happen, and
a real run's PNGs (parameters, sizes, grid, tensorboard, the same bytes when run again)."""
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_images
from helpers import T2I, fast_flags, read_lora, recipe_error, run
from PIL import Image

from sdlora.recipes import text_to_image as t2i
from sdlora.errors import UserError
from sdlora.training.prompts import SamplePrompt, parse_line, read
from sdlora.training.samples import due


def test_all_options_case_insensitive_in_any_order():
    p = parse_line("a cat, oil painting --n blurry, low quality --W 512 --h 768 --d 42 --L 7 --s 28", 64)
    assert p == SamplePrompt("a cat, oil painting", "blurry, low quality", 512, 768, 28, 7.0, 42)
    assert parse_line("a cat --s 3 --n x --l 4.5", 64) == SamplePrompt("a cat", "x", 64, 64, 3, 4.5, None)


def test_defaults():
    # width/height: --resolution; 20 DPM++ steps; guidance 7.5; seed None = the run's seed + prompt index
    assert parse_line("  a dog  ", 32) == SamplePrompt("a dog", "", 32, 32, 20, 7.5, None)


def test_dashes_inside_a_prompt_are_text():
    # as in kohya: an option starts at " --" only
    assert parse_line("a--b well-lit -x cat--", 32).prompt == "a--b well-lit -x cat--"
    assert parse_line("a--b --n c--d", 32) == SamplePrompt("a--b", "c--d", 32, 32)


def test_file_skips_blank_and_comment_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeff# my prompts\r\n\r\na cat --d 1\r\n   # indented comment\r\n\ta dog\r\n".encode())
    assert read(f, 32) == (SamplePrompt("a cat", seed=1, width=32, height=32), SamplePrompt("a dog", width=32, height=32))


@pytest.mark.parametrize("line,expect", [
    ("a cat --x 1", "unknown option '--x'"),
    ("a cat -- dog", "unknown option '--'"),
    ("a cat --w 512px", "--w must be a positive multiple of 8 (got '512px')"),
    ("a cat --w wide", "--w must be a positive multiple of 8"),
    ("a cat --h 50", "--h must be a positive multiple of 8 (got '50')"),
    ("a cat --h 0", "--h must be a positive multiple of 8"),
    ("a cat --s 0", "--s must be a whole number from 1 to 1000 (got '0')"),
    ("a cat --s 2.5", "--s must be a whole number"),
    ("a cat --d -1", "--d must be a whole number from 0"),
    ("a cat --l high", "--l must be a number >= 0"),
    ("a cat --l inf", "--l must be a number >= 0"),
    ("a cat --n", "--n needs a value"),
    ("a cat --w 64 --w 32", "--w is given twice"),
    ("--w 64 --h 64", "no prompt before the options"),
])
def test_bad_line_names_file_and_line(tmp_path, line, expect):
    f = tmp_path / "p.txt"
    f.write_text(f"# header\na good prompt\n{line}\n")
    with pytest.raises(UserError) as e:
        read(f, 32)
    msg = str(e.value)
    assert msg.startswith(f"{f}, line 3: ") and expect in msg and "\n" not in msg


@pytest.mark.parametrize("setup,extra,expect", [
    (None, {}, "no such file"),
    ("bytes", {}, "line 2: not UTF-8 text"),
    ("# only a comment\n\n", {}, "no prompts in it"),
    ("a cat --q 1\n", {}, "p.txt, line 1: unknown option '--q'"),
    ("json", {}, "only the text format is read"),
    ("dir", {}, "a folder, not a text file"),
    ("a cat\n", {"sample_every_n_steps": 0}, "--sample_every_n_steps must be >= 1"),
    ("a cat\n", {"sample_every_n_epochs": -2}, "--sample_every_n_epochs must be >= 1"),
])
def test_bad_file_is_one_error_line_before_any_model_loads(tiny_model, tmp_path, capsys, no_model_loads,
                                                           setup, extra, expect):
    f = tmp_path / "p.txt"
    if setup == "bytes":
        f.write_bytes(b"a cat\na caf\xe9\n")  # Latin-1
    elif setup == "json":
        f = tmp_path / "p.json"
        f.write_text(json.dumps([{"prompt": "a cat"}]))
    elif setup == "dir":
        f.mkdir()
    elif setup is not None:
        f.write_text(setup)
    data = make_images(tmp_path / "d", n=1)
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, sample_prompts=f,
                                               **extra))
    assert expect in msg and (extra or str(f) in msg), msg


@pytest.mark.parametrize("flag,value", [("sample_every_n_steps", 2), ("sample_every_n_epochs", 1),
                                        ("sample_at_first", True)])
def test_cadence_without_prompts_is_an_error(tiny_model, tmp_path, capsys, no_model_loads, flag, value):
    data = make_images(tmp_path / "d", n=1)
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, **{flag: value}))
    assert f"--{flag} needs --sample_prompts FILE" in msg


def _rounds(steps=None, epochs=None, max_steps=8, epoch_of=lambda s: s // 3):
    c = SimpleNamespace(sample_prompts=(SamplePrompt("x"),), sample_every_n_steps=steps, sample_every_n_epochs=epochs)
    return [s for s in range(1, max_steps + 1) if due(c, s, epoch_of(s - 1), epoch_of(s), s == max_steps)]


def test_when_rounds_happen():
    assert _rounds() == [8]  # no cadence: once, at the end
    assert _rounds(steps=3) == [3, 6]  # a cadence: no extra round at the end
    assert _rounds(epochs=1) == [3, 6]  # 3 steps an epoch
    assert _rounds(epochs=2) == [6]
    assert _rounds(steps=4, epochs=1) == [3, 4, 6, 8]  # both; one round per step
    assert _rounds(steps=3, epochs=1) == [3, 6]
    assert _rounds(epochs=3, epoch_of=lambda s: 2 * s) == [2, 3, 5, 6, 8]  # steps that finish 2 epochs at once
    none = SimpleNamespace(sample_prompts=(), sample_every_n_steps=None, sample_every_n_epochs=None)
    assert not due(none, 8, 1, 2, True)


def test_training_writes_sample_rounds_and_reruns_identically(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_images(tmp_path / "d", n=4)
    prompts = tmp_path / "p.txt"
    prompts.write_text("# two prompts\na red square --n blurry, dark --w 48 --h 32 --d 7 --s 3\n\n"
                       "a blue square --s 3 --l 5\n")
    flags = dict(train_data_dir=data, max_train_steps=4, sample_prompts=prompts, sample_every_n_steps=2,
                 report_to="tensorboard", seed=11)
    first, second = tmp_path / "a" / "shapes", tmp_path / "b" / "shapes"
    run(T2I, fast_flags(tiny_model, first, **flags))
    rounds = [f"step{s:06d}_{n}.png" for s in (2, 4) for n in ("00", "01", "grid")]
    assert sorted(p.name for p in (first / "samples").iterdir()) == rounds

    for step in (2, 4):
        a, b = Image.open(first / f"samples/step{step:06d}_00.png"), Image.open(first / f"samples/step{step:06d}_01.png")
        assert a.size == (48, 32) and b.size == (32, 32)  # --w/--h, else --resolution
        assert Image.open(first / f"samples/step{step:06d}_grid.png").size == (96, 32)
        pa, pb = json.loads(a.text["sdlora"]), json.loads(b.text["sdlora"])
        assert (pa["prompt"], pa["negative_prompt"], pa["seed"], pa["steps"], pa["guidance"]) == \
            ("a red square", "blurry, dark", 7, 3, 7.5)
        assert (pb["prompt"], pb["negative_prompt"], pb["seed"], pb["guidance"]) == ("a blue square", None, 12, 5)
        assert (pa["width"], pa["height"], pa["step"], pb["step"]) == (48, 32, step, step)
        assert pa["base"] == str(tiny_model) and pa["loras"] == [{"name": "shapes", "weight": 1.0}]
        assert a.text["parameters"] == (f"a red square <lora:shapes:1>\nNegative prompt: blurry, dark\nSteps: 3, "
                                        f"Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 7, Size: 48x32, Model: {tiny_model}")
    events = EventAccumulator(str(first / "logs" / "sdlora")).Reload()
    assert [e.step for e in events.Images("samples/00")] == [2, 4]
    assert (events.Images("samples/00")[0].width, events.Images("samples/01")[0].width) == (48, 32)

    # Again with a round at first: the same images at steps 2 and 4 (sampling leaves training alone)
    run(T2I, fast_flags(tiny_model, second, sample_at_first=True, **flags))
    assert sorted(p.name for p in (second / "samples").iterdir()) == \
        [f"step000000_{n}.png" for n in ("00", "01", "grid")] + rounds
    for name in rounds:
        assert (first / "samples" / name).read_bytes() == (second / "samples" / name).read_bytes(), name
    a, b = (read_lora(out / "pytorch_lora_weights.safetensors")[0] for out in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # (the header has a date)
