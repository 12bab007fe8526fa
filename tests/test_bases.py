"""Bases of every shape: sizes read from the base's own configs (not SD's 8 and 512), a damaged base folder as
one line naming the file before any weights load (train and generate), and the plan a run states."""
import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import make_images
from helpers import fast_flags, read_lora, recipe_error
from PIL import Image

from sdlora.recipes import text_to_image as t2i
from sdlora.cli import main as cli
from sdlora.cli.run import run as run_recipe


def _edit(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep(path.stat().st_size)])


UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
# name: (how the copy of the tiny base is damaged, the file the one line names, words in it)
BAD_BASES = {
    "no tokenizer folder": (lambda d: shutil.rmtree(d / "tokenizer"), "tokenizer", "missing"),
    "tokenizer.json not JSON": (lambda d: (d / "tokenizer" / "tokenizer.json").write_text("{oops"),
                                "tokenizer/tokenizer.json", "not valid JSON"),
    "tokenizer without a length": (lambda d: _edit(d / "tokenizer" / "tokenizer_config.json", model_max_length=None),
                                   "tokenizer/tokenizer_config.json", "model_max_length is null"),
    "absurd UNet channels": (lambda d: _edit(d / "unet" / "config.json", block_out_channels=[32, 10**12]),
                             "unet/config.json", "no unet can be built"),
    "UNet channels its weights lack": (lambda d: _edit(d / "unet" / "config.json", block_out_channels=[32, 100000]),
                                       UNET_WEIGHTS, "describes a unet of"),
    "negative UNet channels": (lambda d: _edit(d / "unet" / "config.json", block_out_channels=[32, -64]),
                               "unet/config.json", "block_out_channels is [32, -64], not a positive whole number"),
    "an inpainting UNet": (lambda d: _edit(d / "unet" / "config.json", in_channels=9), "unet/config.json",
                           "in_channels is 9, but the VAE's latents have 4 channels"),
    "truncated UNet weights": (lambda d: _cut(d / UNET_WEIGHTS, lambda n: n // 2), UNET_WEIGHTS, "truncated"),
    "empty UNet weights": (lambda d: _cut(d / UNET_WEIGHTS, lambda n: 0), UNET_WEIGHTS, "damaged safetensors file"),
    "garbage UNet weights": (lambda d: (d / UNET_WEIGHTS).write_bytes(b"garbage" * 100), UNET_WEIGHTS,
                             "damaged safetensors file"),
    "model_index.json not JSON": (lambda d: (d / "model_index.json").write_text("{not json"), "model_index.json",
                                  "not valid JSON"),
    "an unknown pipeline class": (lambda d: _edit(d / "model_index.json", _class_name="FooPipeline"),
                                  "model_index.json", "names pipeline 'FooPipeline'"),
}


def _bad_base(tiny_model, tmp_path, case):
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    damage, _, _ = BAD_BASES[case]
    damage(base)
    return base


def _check_line(line: str, base, case):
    _, file, words = BAD_BASES[case]
    assert line.startswith(f"error: {base / file}") and words in line, line
    assert "allow_pickle" not in line and "allow-pickle" not in line, line  # not the advice for a damaged file


@pytest.mark.parametrize("case", list(BAD_BASES))
def test_a_bad_base_trains_into_one_line_naming_the_file(tiny_model, tmp_path, capsys, no_model_loads, case):
    base = _bad_base(tiny_model, tmp_path, case)
    data = make_images(tmp_path / "d", n=1)
    _check_line(recipe_error(capsys, t2i, fast_flags(base, tmp_path / "o", train_data_dir=data)), base, case)


@pytest.mark.parametrize("case", ["no tokenizer folder", "garbage UNet weights", "absurd UNet channels",
                                  "an unknown pipeline class"])
def test_generate_on_a_bad_base_is_one_line_naming_the_file(tiny_model, tmp_path, capsys, no_model_loads,
                                                            monkeypatch, case):
    import diffusers

    def boom(*a, **k):
        raise AssertionError("the pipeline was loaded before the problem was reported")
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", boom)
    base = _bad_base(tiny_model, tmp_path, case)
    assert cli(["generate", "a red square", "--base", str(base), "--steps", "1", "--out", str(tmp_path / "g")]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1
    _check_line(lines[0], base, case)
    assert not (tmp_path / "g").exists()


def test_sdxl_time_ids_are_checked_against_the_unet(sdxl_model, tmp_path, capsys, no_model_loads):
    base = tmp_path / "xl"
    shutil.copytree(sdxl_model, base)
    _edit(base / "unet" / "config.json", addition_time_embed_dim=4)  # 6 x 4 + 32 is not its 80
    data = make_images(tmp_path / "d", n=1, size=64)
    line = recipe_error(capsys, t2i, fast_flags(base, tmp_path / "o", train_data_dir=data, resolution=64))
    assert line.startswith(f"error: {base / 'unet' / 'config.json'}: projection_class_embeddings_input_dim is 80, "
                           f"but SDXL's 6 time ids x addition_time_embed_dim 4 + the pooled text (32) make 56"), line


SD3_BASE = Path(__file__).resolve().parents[1] / "sdlora" / "assets" / "tiny-sd3"
SD3_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
# An SD3 folder's faults, as BAD_BASES: (damage, the file the one line names, words in it)
BAD_SD3 = {
    "truncated transformer weights": (lambda d: _cut(d / SD3_WEIGHTS, lambda n: n - 100), SD3_WEIGHTS, "truncated"),
    "transformer layers its weights lack": (lambda d: _edit(d / "transformer" / "config.json", num_layers=40),
                                            SD3_WEIGHTS, "describes a transformer of"),
    "negative patch size": (lambda d: _edit(d / "transformer" / "config.json", patch_size=-2),
                            "transformer/config.json", "patch_size is -2, not a positive whole number"),
    "a VAE of other latents": (lambda d: _edit(d / "vae" / "config.json", latent_channels=16),
                               "transformer/config.json", "in_channels is 4, but the VAE's latents have 16"),
    "CLIPs of another model": (lambda d: _edit(d / "text_encoder_2" / "config.json", projection_dim=32),
                               "transformer/config.json", "pooled_projection_dim is 128, but the two CLIPs' pooled "
                                                          "projections give 96"),
    "a T5 of another width": (lambda d: _edit(d / "text_encoder_3" / "config.json", d_model=256),
                              "transformer/config.json", "joint_attention_dim is 128, but T5 gives 256"),
    "no T5 tokenizer": (lambda d: shutil.rmtree(d / "tokenizer_3"), "tokenizer_3", "missing"),
    "garbage T5 weights": (lambda d: (d / "text_encoder_3" / "model.safetensors").write_bytes(b"x" * 64),
                           "text_encoder_3/model.safetensors", "damaged safetensors file"),
}


@pytest.mark.parametrize("case", list(BAD_SD3))
def test_a_bad_sd3_base_is_one_line_naming_the_file_before_any_weights_load(tmp_path, capsys, no_model_loads, case):
    base = tmp_path / "sd3"
    shutil.copytree(SD3_BASE, base)
    damage, file, words = BAD_SD3[case]
    damage(base)
    data = make_images(tmp_path / "d", n=1)
    line = recipe_error(capsys, t2i, fast_flags(base, tmp_path / "o", train_data_dir=data))
    assert line.startswith(f"error: {base / file}") and words in line, line


def test_an_sd3_base_with_damaged_t5_weights_passes_the_check_with_drop_t5(tmp_path, capsys, no_model_loads):
    """--drop_t5: T5 is not loaded, so damaged (or absent) T5 weights pass the check (the same
    damage is one line without the flag)."""
    base = tmp_path / "sd3"
    shutil.copytree(SD3_BASE, base)
    (base / "text_encoder_3" / "model.safetensors").write_bytes(b"x" * 64)
    data = make_images(tmp_path / "d", n=1)
    flags = fast_flags(base, tmp_path / "o", train_data_dir=data)
    assert "text_encoder_3/model.safetensors" in recipe_error(capsys, t2i, flags)
    from sdlora.basecheck import check

    check(str(base), t5=False)  # no error


# ---------------------------------------------------------------- the base's own sizes

@pytest.fixture(scope="module")
def x4_base(tmp_path_factory):
    """A tiny base whose pixel multiple is 4: a VAE of two blocks (2x) under a UNet of two blocks (2x)."""
    import torch
    from diffusers import AutoencoderKL

    from sdlora.tiny import ARCHS, make_tiny

    base = make_tiny(tmp_path_factory.mktemp("models") / "x4")
    torch.manual_seed(0)
    vae = AutoencoderKL(**dict(ARCHS["tiny"]["vae"], block_out_channels=(16, 32), down_block_types=(
        "DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))
    shutil.rmtree(base / "vae")
    vae.save_pretrained(base / "vae")
    return base


@pytest.mark.parametrize("no_bucket", [False, True])
def test_a_base_with_a_4x_pixel_multiple_trains_with_and_without_buckets(x4_base, tmp_path, capsys, no_bucket):
    data = tmp_path / "d"
    data.mkdir()
    for i, size in enumerate([(40, 24), (24, 40), (32, 32)]):  # landscape, portrait, square
        Image.new("RGB", size, (60 * i, 100, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"picture {i}")
    out = tmp_path / "o"
    argv = fast_flags(x4_base, out, train_data_dir=data, resolution=None, max_train_steps=2, train_batch_size=1,
                      no_bucket=no_bucket)
    assert run_recipe(t2i.parse_args(argv), t2i.make_recipe) == 0
    err = capsys.readouterr().err
    assert "at 16 px" in err  # its own size: UNet sample_size 8 x the VAE's 2
    # in buckets, sides step by 4 (20 x 12 is no multiple of 8); without, square 16 px crops
    assert ("square 16x16 crops" in err) == no_bucket and ("20x12: 1" in err) != no_bucket, err[-2000:]
    assert read_lora(out / "pytorch_lora_weights.safetensors")[1]["modelspec.resolution"] == "16x16"


@pytest.mark.parametrize("extra,expect", [
    ({"resolution": 17}, "--resolution must be a multiple of 2, the VAE's downsampling (got 17); use 16 or 18"),
    ({"resolution": 20, "validation_prompt": "a cat"}, "--resolution 20: --validation_prompt draws images at it, and "
     "diffusers' pipelines draw sides in multiples of 8; give --resolution 16 or 24"),
    ({"bucket_reso_steps": 3}, "--bucket_reso_steps must be a multiple of 2, the VAE's downsampling (got 3); use 4"),
])
def test_sizes_are_checked_against_the_bases_own_factor(x4_base, tmp_path, capsys, no_model_loads, extra, expect):
    data = make_images(tmp_path / "d", n=1)
    line = recipe_error(capsys, t2i, fast_flags(x4_base, tmp_path / "o", train_data_dir=data, **extra))
    assert line == f"error: {expect}"


def test_a_token_length_past_the_text_encoders_positions_is_one_line(tiny_model, tmp_path, capsys, no_model_loads):
    from sdlora.recipes import dreambooth as db

    inst = make_images(tmp_path / "i", n=1, captions=False)
    line = recipe_error(capsys, db, fast_flags(tiny_model, tmp_path / "o", instance_data_dir=inst, instance_prompt="sks",
                                               tokenizer_max_length=100))
    assert line == "error: --tokenizer_max_length 100: the base's text encoder takes at most 77 tokens " \
                   "(max_position_embeddings); use 77 or less"


def test_the_bundled_model_trains_at_its_own_32px_and_logs_the_plan_and_pace(tmp_path, capsys):
    data = make_images(tmp_path / "d", n=2)
    out = tmp_path / "o"
    argv = fast_flags("sdlora-tiny", out, train_data_dir=data, resolution=None, max_train_steps=4, train_batch_size=1)
    assert run_recipe(t2i.parse_args(argv), t2i.make_recipe) == 0
    err = capsys.readouterr().err
    plan = [x for x in err.splitlines() if "sdlora: plan:" in x]
    assert plan == ["INFO sdlora: plan: 4 steps (2 epochs) at 32 px, batch 1 x 1 accum x 1 procs; the time per step "
                    "is logged after the first steps"], err[-2000:]
    assert err.index("sdlora: plan:") < err.index("base model: SD 1.x")  # before any model loads
    assert len(pace := [x for x in err.split("INFO ") if x.startswith("sdlora: pace:")]) == 1, err[-2000:]
    assert " s/step over the first " in pace[0] and "for the remaining " in pace[0]
    assert read_lora(out / "pytorch_lora_weights.safetensors")[1]["modelspec.resolution"] == "32x32"


def test_a_resolution_far_above_the_bases_own_is_warned(tmp_path, caplog):
    from sdlora.cli.flags import train_config

    data = make_images(tmp_path / "d", n=1)
    with caplog.at_level(logging.WARNING, "sdlora"):
        assert train_config(t2i.parse_args(fast_flags("sdlora-tiny", tmp_path / "o", train_data_dir=data,
                                               resolution=512))).resolution == 512
    assert "--resolution 512 is 16x this base's own size (32 px" in caplog.text


def test_generate_sides_are_checked_against_the_base_and_one_side_keeps_the_other_own(tiny_model, tmp_path, capsys,
                                                                                      no_model_loads):
    assert cli(["generate", "p", "--base", str(tiny_model), "--width", "36", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --width 36: must be a positive multiple of 8 for this base model (its VAE's downsampling " \
                  "and diffusers' 8); use 32 or 40", err
    from sdlora.pipeline import image_size, load_base

    pipe = load_base(tiny_model, allow_pickle=False)  # (fp32: not through the patched loaders)
    assert image_size(pipe, 48, None) == (48, 32)  # diffusers alone would draw 32 x 32, dropping the width
