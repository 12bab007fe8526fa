"""load_pipeline / generate / fuse on a real tiny pipeline: exact stacking, fusing, errors, the CLI."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PY, ROOT
from PIL import Image
from safetensors.torch import save_file
from test_formats import LAYERS, rich_lora

from sdlora.cli import main
from sdlora.errors import UserError
from sdlora import models
from sdlora.lora import formats
from sdlora.lora.formats import files as lora_files
from sdlora.pipeline import (
    Adapters,
    fuse_loras,
    grid,
    load_adapters,
    load_base,
    load_pipeline,
    parse_spec,
    sample,
    unfuse_loras,
)
from sdlora.testing import demo_lora

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lora_dir(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "style"
    demo_lora(out, base=tiny_model, rank=4, alpha=8, strength=1.0)
    return out


def _images(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a red square", num_inference_steps=3, generator=g, output_type="np").images


def test_parse_spec():
    assert parse_spec("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_spec("user/repo") == ("user/repo", 1.0)
    assert parse_spec("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    assert parse_spec(("x", 2)) == ("x", 2.0)


def test_load_pipeline_takes_base_from_card_and_uses_dpm(lora_dir, tiny_model):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    adapters = load_adapters([f"{lora_dir}:0.6"], device="cpu")
    pipe = adapters.pipe
    assert type(pipe) is StableDiffusionPipeline and isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert adapters.base == str(tiny_model)
    assert pipe.get_active_adapters() == ["style"] and adapters.loaded["style"]["weight"] == 0.6
    assert not [k for k in vars(pipe) if k.startswith("sdlora")]  # sdlora's records live in `adapters`
    plain = _images(load_pipeline([], base=tiny_model, device="cpu"))
    assert abs(_images(pipe) - plain).max() > 1e-2


def test_missing_base_is_an_error_naming_the_lora(pipe_lora_file):
    with pytest.raises(UserError, match=f"{pipe_lora_file}: the LoRA names no base model"):
        load_pipeline([pipe_lora_file])


@pytest.fixture
def pipe_lora_file(tiny_model, tmp_path):
    """A LoRA file with no card and no base metadata."""
    pipe = load_base(tiny_model)
    path = tmp_path / "bare.safetensors"
    lora = rich_lora(pipe)
    lora.base_model = None
    formats.save_lora(lora, path, "kohya")
    return path


def test_stacking_is_exact(tiny_model):
    """With weights s1, s2 every layer computes W + s1·B1A1·α1/r1 + s2·B2A2·α2/r2."""
    pipe = load_base(tiny_model)
    l1, l2 = rich_lora(pipe, seed=1), rich_lora(pipe, seed=2, layers=[(n, r + 1, a * 3) for n, r, a in LAYERS[::2]])
    base = {n: getattr(pipe, n.split(".")[0]).get_submodule(formats.live_path(*n.split(".", 1))) for n in l1.modules}
    weights = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
               for n, m in base.items()}
    Adapters(pipe).add([(l1, 0.7), (l2, -1.3)])
    assert len(pipe.get_active_adapters()) == 2
    for name in base:
        layer = getattr(pipe, name.split(".")[0]).get_submodule(formats.live_path(*name.split(".", 1)))
        assert hasattr(layer, "lora_A")  # now peft's LoRA wrapper
        w, b = weights[name]
        w = w + 0.7 * l1.modules[name].delta() + (-1.3 * l2.modules[name].delta() if name in l2.modules else 0)
        if w.dim() == 4:
            x = torch.randn(2, w.shape[1], 6, 6)
            expected = F.conv2d(x, w, b, stride=layer.base_layer.stride, padding=layer.base_layer.padding)
        else:
            x = torch.randn(3, w.shape[1])
            expected = F.linear(x, w, b)
        assert torch.allclose(layer(x), expected, atol=1e-5), name


def test_fused_matches_unfused_and_unfusing_restores_base_exactly(lora_dir, tiny_model):
    pipe = load_base(tiny_model)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    Adapters(pipe).add([(rich_lora(pipe, seed=3), 0.8), (formats.load_lora(lora_dir), 0.5)])
    unfused = _images(pipe)
    originals = fuse_loras(pipe)
    assert abs(_images(pipe) - unfused).max() <= 1e-4
    unfuse_loras(pipe, originals)
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_other_architectures_are_refused_and_nothing_is_applied(tiny_model, lora_dir, tmp_path):
    pipe = load_base(tiny_model)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.ones(4, 640),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(640, 4),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 1280),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(1280, 4)},
              str(sdxl))
    sd15 = tmp_path / "sd15.safetensors"  # right key names, SD1.5 widths (cross-attention 768)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.ones(4, 768), f"{name}.lora_up.weight": torch.ones(32, 4)}, str(sd15))
    adapters = Adapters(pipe)
    for bad, found in [(sdxl, "SDXL"), (sd15, "SD 1.x")]:
        with pytest.raises(UserError) as e:
            adapters.add([(lora_dir, 1.0), (bad, 1.0)])  # the good one first: it must not stay applied
        msg = str(e.value)
        assert str(bad) in msg and f"LoRA for {found}" in msg and "cross-attention dim 32" in msg, msg
    assert "768" in msg and "[32, 32]" in msg
    assert not getattr(pipe.unet, "peft_config", None) and not adapters.loaded


def test_generate_cli_writes_pngs_with_parameters_and_a_grid(lora_dir, tiny_model, tmp_path):
    out = tmp_path / "imgs"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([PY, "-m", "sdlora.cli", "generate", "a red square", "--lora", f"{lora_dir}:0.7",
                        "--steps", "3", "--num-images", "2", "--seed", "42", "--guidance", "5", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000-42.png", "00000-grid.png", "00001-43.png"]
    params = json.loads(Image.open(out / "00001-43.png").text["sdlora"])
    assert params["prompt"] == "a red square" and params["seed"] == 43 and params["steps"] == 3
    assert params["guidance"] == 5 and params["base"] == str(tiny_model)
    assert [(lo["name"], lo["weight"]) for lo in params["loras"]] == [("style", 0.7)]
    assert "Seed: 43" in Image.open(out / "00001-43.png").text["parameters"]
    assert Image.open(out / "00000-grid.png").size == (64, 32)
    assert "%|" in r.stderr  # a progress bar

    assert params["precision"] == models.fast_precision("cpu")  # bf16 where the CPU computes it natively

    # image 1 alone (seed 43) is the same picture; --fuse gives the same picture too (exactly in fp32; in bf16
    # the fused weights round differently, a few levels at most)
    for dtype, tolerance in (("fp32", 1), ("bf16", 12)):
        for fuse in ([], ["--fuse"]):
            assert main(["generate", "a red square", "--lora", f"{lora_dir}:0.7", "--steps", "3", "--seed", "43",
                         "--guidance", "5", "--dtype", dtype, *fuse, "--out", str(out / dtype)]) == 0
        a, b = (np.asarray(Image.open(out / dtype / f"0000{i}-43.png"), dtype=float) for i in (0, 1))
        assert abs(a - b).max() <= tolerance, (dtype, abs(a - b).max())
        assert json.loads(Image.open(out / dtype / "00001-43.png").text["sdlora"])["fused"] is True
        if dtype == models.fast_precision("cpu"):  # the default draws what its precision draws
            assert abs(a - np.asarray(Image.open(out / "00001-43.png"), dtype=float)).max() <= 1


def test_generate_defaults_to_the_guidance_the_bundled_model_was_measured_at(tmp_path):
    """sdlora-tiny without --guidance samples at 3 (what its demo was measured at), and a command line with
    bitsandbytes installed stays free of its CPU-kernel notice; an explicit --guidance wins."""
    out = tmp_path / "imgs"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([PY, "-m", "sdlora.cli", "generate", "a red square", "--base", "sdlora-tiny", "--steps", "1",
                        "--seed", "1", "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(Image.open(out / "00000-1.png").text["sdlora"])["guidance"] == 3
    assert "CFG scale: 3," in Image.open(out / "00000-1.png").text["parameters"]
    assert "gemm_4bit_forward" not in r.stderr and "publisher trust" not in r.stderr
    assert main(["generate", "a red square", "--base", "sdlora-tiny", "--steps", "1", "--seed", "1",
                 "--guidance", "5.5", "--out", str(out)]) == 0
    assert json.loads(Image.open(out / "00001-1.png").text["sdlora"])["guidance"] == 5.5
    # by its folder too; any other base: diffusers' usual 7.5
    assert models.default_guidance(str(models.BUNDLED["sdlora-tiny-xl"])) == models.BUNDLED_GUIDANCE["sdlora-tiny-xl"]
    assert models.default_guidance("runwayml/stable-diffusion-v1-5") == models.default_guidance(tmp_path) == 7.5


def test_grid_of_mixed_sizes_centres_each_image_in_the_largest_cell():
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (48, 16), (0, 0, 255))
    sheet = grid([red, blue])
    assert sheet.size == (96, 32)  # two 48 x 32 cells
    white = (255, 255, 255)
    assert sheet.getpixel((7, 0)) == sheet.getpixel((40, 31)) == white  # red, 8 px in from each side
    assert sheet.getpixel((8, 0)) == sheet.getpixel((39, 31)) == (255, 0, 0)
    assert sheet.getpixel((48, 7)) == sheet.getpixel((95, 24)) == white  # blue, 8 px down from the top
    assert sheet.getpixel((48, 8)) == sheet.getpixel((95, 23)) == (0, 0, 255)
    assert grid([red, red], scale=2).size == (128, 64)  # same sizes: as before


def test_sample_takes_negative_prompts(tiny_model):
    from sdlora.models import encode_prompts

    pipe = load_pipeline([], base=tiny_model, device="cpu")

    def draw(negs, encode=None):
        return np.stack([np.asarray(im) for im in sample(pipe, ["a red square"] * 2, [0, 1], steps=3, batch=2,
                                                         encode=encode, negative_prompts=negs)])

    plain = draw(None)
    assert np.array_equal(draw(["", ""]), plain)  # "" is what no negative prompt means
    negative = draw(["a blue square", ""])
    assert not np.array_equal(negative[0], plain[0]) and np.array_equal(negative[1], plain[1])

    def encode(texts):  # training's own encoder: the negative prompt goes through it too
        return encode_prompts(pipe.text_encoder, pipe.tokenizer, texts)
    assert np.array_equal(draw(None, encode), plain)
    assert np.array_equal(draw(["a blue square", ""], encode), negative)


def test_sample_reports_each_batch_and_draws_the_same_images(tiny_model):
    pipe = load_pipeline([], base=tiny_model, device="cpu")
    calls = []
    with_progress = sample(pipe, ["a red square"] * 5, list(range(5)), steps=2, batch=2,
                           on_batch=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    plain = sample(pipe, ["a red square"] * 5, list(range(5)), steps=2, batch=2)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(with_progress, plain))


def test_fuse_cli_writes_a_loadable_pipeline(lora_dir, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    assert main(["fuse", "--lora", f"{lora_dir}:0.8", "--out", str(tmp_path / "fused")]) == 0
    fused = StableDiffusionPipeline.from_pretrained(str(tmp_path / "fused"))
    reference = load_pipeline([f"{lora_dir}:0.8"], scheduler="keep", device="cpu", dtype="fp32")  # exactness: fp32
    assert abs(_images(fused) - _images(reference)).max() <= 1e-4
    assert not any("lora" in k for k in fused.unet.state_dict())


def test_cli_errors_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "lora.ckpt"
    torch.save({"x": torch.ones(1)}, bad)
    r = subprocess.run([PY, "-m", "sdlora.cli", "generate", "p", "--lora", str(bad), "--base", "x"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(bad) in lines[0] and "--allow-pickle" in lines[0]


def test_default_precision_is_the_fast_path_and_loads_half_weights_exactly(tiny_model):
    """load_pipeline with no dtype samples in fp16 on a GPU, bf16 on a CPU with native bf16 (fp32 otherwise); in
    half precision the UNet and VAE are read cast tensor by tensor, bit-identical to diffusers' own cast."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    pipe = load_pipeline([], base=tiny_model, device="cpu")
    assert pipe.unet.dtype == pipe.vae.dtype == models.torch_dtype(models.fast_precision("cpu"))
    pipe = load_pipeline([], base=tiny_model, device="cpu", dtype="bf16")
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        theirs = cls.from_pretrained(str(tiny_model), subfolder=name, torch_dtype=torch.bfloat16).state_dict()
        ours = getattr(pipe, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("argv, said", [
    (["--out", "{file}"], "--out {file}: {file} exists and is a file, not a folder; choose another name"),
    (["--width", "33"], "--width 33: must be a positive multiple of 8 for this base model (its VAE's downsampling and diffusers' 8); use 32 or 40"),
    (["--height", "0"], "--height 0: must be a positive multiple of 8"),
    (["--width", "1000000"], "--width 1000000: too large for this base model; at most 256 (8x its own size of 32)"),
    (["--lora", "{lora}:nan"], "{lora}:nan: the LoRA's weight must be a finite number"),
    (["--lora", "{lora}:-inf"], "{lora}:-inf: the LoRA's weight must be a finite number"),
], ids=["out-is-a-file", "width-33", "height-0", "width-1000000", "weight-nan", "weight-inf"])
def test_generate_refuses_bad_out_size_and_weight_before_loading(lora_dir, tmp_path, monkeypatch, capsys, argv, said):
    import sdlora.pipeline

    def boom(*a, **k):
        raise AssertionError("the base model was loaded before the problem was reported")
    monkeypatch.setattr(sdlora.pipeline, "load_base", boom)
    (tmp_path / "file").write_text("mine")
    fill = {"{file}": str(tmp_path / "file"), "{lora}": str(lora_dir)}
    argv, said = ([fill.get(a, a).replace("{lora}", str(lora_dir)) for a in argv],
                  said.replace("{file}", fill["{file}"]).replace("{lora}", str(lora_dir)))
    assert main(["generate", "p", "--lora", str(lora_dir), "--out", str(tmp_path / "imgs"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {said}"), err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_mistyped_local_lora_path_is_never_sent_to_the_hub(lora_dir, tmp_path, monkeypatch, capsys):
    asked = []

    def hub(repo):  # the Hub, stubbed: never a real request
        asked.append(repo)
        return formats.resolve_file(lora_dir)
    monkeypatch.setattr(lora_files, "from_hub", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    for spec in ("demo/nope", "./nope", "../nope", "demo/nope.safetensors", "user/nope.safetensors", "a/b/c", "a\\b"):
        assert main(["generate", "p", "--lora", spec]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"error: {spec}: no such LoRA file or folder"), err
        if spec == "demo/nope":
            assert "(demo exists here, so this names a local path, not a Hub id)" in err
    assert asked == []
    assert formats.load_lora("someone/style").modules and asked == ["someone/style"]  # a Hub id still goes there


def test_generate_flags_are_snake_case_with_dashed_aliases(lora_dir, tmp_path, capsys):
    from sdlora.cli import build_parser

    parse = build_parser().parse_args
    snake = parse(["generate", "p", "--negative_prompt", "n", "--num_images", "3", "--allow_pickle"])
    dashed = parse(["generate", "p", "--negative-prompt", "n", "--num-images", "3", "--allow-pickle"])
    assert vars(snake) == vars(dashed) and (snake.negative_prompt, snake.num_images, snake.allow_pickle) == ("n", 3, True)
    assert parse(["generate", "p"]).num_images == 1
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    shown = capsys.readouterr().out
    assert "--negative_prompt" in shown and "--num_images" in shown and "--negative-prompt" not in shown
    # any multiple of 8 within the limit draws, not only the UNet's own multiple (32 here)
    out = tmp_path / "imgs"
    assert main(["generate", "p", "--lora", str(lora_dir), "--num_images", "2", "--negative_prompt", "blue",
                 "--width", "40", "--height", "48", "--steps", "1", "--seed", "5", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000-5.png", "00000-grid.png", "00001-6.png"]
    assert Image.open(out / "00001-6.png").size == (40, 48)
    assert json.loads(Image.open(out / "00001-6.png").text["sdlora"])["negative_prompt"] == "blue"
    assert json.loads(Image.open(out / "00001-6.png").text["sdlora"])["guidance"] == 7.5  # not a bundled base


def test_fuse_replaces_an_existing_out_folder_only_with_overwrite(lora_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["fuse", "--lora", str(lora_dir), "--out", str(mine)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {mine}: exists; choose another name or pass --overwrite"
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
