"""Bad input: one clear line naming the file/flag, before any model is loaded."""
import json

import pytest
from conftest import make_images
from helpers import T2I, fast_flags, recipe_error, run
from PIL import Image

from sdlora.recipes import dreambooth as db
from sdlora.recipes import text_to_image as t2i


def test_mixed_folder_trains_on_good_images(tiny_model, tmp_path):
    data = make_images(tmp_path / "d", n=3)
    (data / "readme.md").write_text("notes")  # side file: ignored silently
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (data / "broken.txt").write_text("caption of a broken image")
    (data / "zero.jpg").write_bytes(b"")
    (data / "doc.pdf").write_bytes(b"%PDF-1.4")
    r = run(T2I, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, max_train_steps=1))
    for name in ("broken.png", "zero.jpg", "doc.pdf"):
        assert r.stderr.count(name) == 1, r.stderr
    assert "readme.md" not in r.stderr
    assert "3 rows" in r.stderr and (tmp_path / "o" / "pytorch_lora_weights.safetensors").exists()


def test_no_usable_image(tiny_model, tmp_path, capsys, no_model_loads):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(b"nope")
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=tmp_path / "d"))
    assert str(tmp_path / "d") in msg and "no readable image" in msg


def test_no_usable_image_subprocess_exit_code(tiny_model, tmp_path):
    (tmp_path / "d").mkdir()
    r = run(T2I, fast_flags(tiny_model, tmp_path / "o", train_data_dir=tmp_path / "d"), check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --train_data_dir")
    assert "Traceback" not in r.stderr


def test_metadata_errors(tiny_model, tmp_path, capsys, no_model_loads):
    d = tmp_path / "d"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "a.png")
    (d / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\nnot json\n')
    assert "metadata.jsonl, line 2" in recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=d))
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "x"}) + "\n")
    assert "found: file_name, prompt" in recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=d))
    (d / "metadata.jsonl").unlink()
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=d))
    assert "a.png: no caption" in msg and "--allow_empty_captions" in msg


@pytest.mark.parametrize("model,expect", [
    ("./no/such/model", "no such folder"),
    ("some-org/some-model", "Hub is unreachable"),
])
def test_unknown_model(tmp_path, capsys, no_model_loads, model, expect, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_images(tmp_path / "d", n=1)
    msg = recipe_error(capsys, t2i, fast_flags(model, tmp_path / "o", train_data_dir=data))
    assert model in msg and expect in msg


def test_folder_that_is_not_a_pipeline(tmp_path, capsys, no_model_loads):
    data = make_images(tmp_path / "d", n=1)
    assert "not a diffusers pipeline folder" in recipe_error(capsys, t2i, fast_flags(tmp_path, tmp_path / "o", train_data_dir=data))


def test_unwritable_output_dir(tiny_model, tmp_path, capsys, no_model_loads):
    data = make_images(tmp_path / "d", n=1)
    (tmp_path / "file").write_text("x")
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "file" / "out", train_data_dir=data))
    assert f"--output_dir {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is a file, not a folder" in msg


@pytest.mark.parametrize("extra,expect", [
    ({"mixed_precision": "fp16"}, "fp16 needs a CUDA GPU"),
    ({"enable_xformers_memory_efficient_attention": True}, "xformers"),
    ({"use_8bit_adam": True}, "bitsandbytes"),
    ({"resolution": 30}, "--resolution must be a multiple of 4, the VAE's downsampling"),  # the tiny VAE's 4
    ({"rank": 0}, "--rank must be >= 1"),
    ({"hub_token": "hf_secret_value", "report_to": "wandb"}, None),
    ({"target_modules": " , "}, "--target_modules is empty"),
    ({"lora_type": "loha", "use_rslora": True}, "--use_rslora can't be used with --lora_type loha"),
    ({"lora_type": "lokr", "init_lora_weights": "pissa"}, "--init_lora_weights pissa can't be used with --lora_type lokr"),
])
def test_contradictory_or_unavailable_flags(tiny_model, tmp_path, capsys, no_model_loads, extra, expect):
    data = make_images(tmp_path / "d", n=1)
    argv = fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, **extra)
    try:
        msg = recipe_error(capsys, t2i, argv)
    except SystemExit as e:  # argparse rejects it first (e.g. wandb not installed as a choice)
        assert e.code == 2
        return
    if expect:
        assert expect in msg, msg
    assert "hf_secret_value" not in msg


def test_both_data_sources_is_an_error(capsys):
    # argparse's error, before anything loads: in-process (an interpreter start cost more than the check)
    with pytest.raises(SystemExit) as e:
        t2i.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "a", "--dataset_name", "b"])
    assert e.value.code == 2 and "exactly one of --dataset_name, --train_data_dir or --dataset_config" in capsys.readouterr().err


def test_epochs_count_micro_batches(tiny_model, tmp_path):
    """5 images, batch 1, accumulation 2, 2 epochs = 10 micro-batches = 5 optimizer steps."""
    data = make_images(tmp_path / "d", n=5)
    r = run(T2I, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, max_train_steps=None, num_train_epochs=2,
                            train_batch_size=1, gradient_accumulation_steps=2))
    assert "5 steps (2 epochs)" in r.stderr, r.stderr[-2000:]


def test_compile_without_a_compiler(tiny_model, tmp_path, capsys, no_model_loads, monkeypatch):
    """--compile on CPU needs a C++ compiler for inductor's kernels: without one it is one line before any load,
    not a failure at the first step."""
    data = make_images(tmp_path / "d", n=1)
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++/c++/clang++ on it
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, compile=True))
    assert "--compile" in msg and "C++ compiler" in msg


def test_pissa_on_conv_layers_is_refused_before_loading(tiny_model, tmp_path, capsys, no_model_loads):
    data = make_images(tmp_path / "d", n=1)
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, init_lora_weights="pissa",
                                               target_modules="to_q,conv1"))
    assert msg.startswith("error: --target_modules conv1: names Conv2d layers") and "--init_lora_weights pissa" in msg


def test_dora_with_pissa_is_refused_before_loading(tiny_model, tmp_path, capsys, no_model_loads):
    data = make_images(tmp_path / "d", n=1)
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, init_lora_weights="olora",
                                               lora_type="dora"))
    assert "--init_lora_weights olora can't be used with --lora_type dora" in msg


@pytest.mark.parametrize("case", ["caption file", "instance caption file", "instance prompt"])
def test_caption_far_too_long_is_one_line(tiny_model, tmp_path, capsys, no_model_loads, case):
    """A 50 MB one-word caption (a wrong file) is refused naming the file or flag, before the tokenizer gets it."""
    data = make_images(tmp_path / "d", n=2)
    with open(data / "img1.txt", "wb") as f:
        f.truncate(50 * 2**20)  # sparse: 50 MB without writing it
    out = tmp_path / "o"
    if case == "caption file":
        msg = recipe_error(capsys, t2i, fast_flags(tiny_model, out, train_data_dir=data))
    else:
        captions = case == "instance caption file"
        msg = recipe_error(capsys, db, fast_flags(tiny_model, out, instance_data_dir=data, instance_captions=captions,
                                                  instance_prompt="a sks square" if captions else "sks " * 20_000))
    expect = "--instance_prompt: 80,000 characters" if case == "instance prompt" else \
        f"{data / 'img1.txt'}: 52,428,800 bytes"
    assert msg.startswith(f"error: {expect}, too long for a caption"), msg
