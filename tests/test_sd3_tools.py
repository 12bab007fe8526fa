"""SD3 / 3.5 LoRA files beyond training: the second file in kohya's SD3 layout (the MMDiT's original names, q/k/v
fused, as kohya's networks/lora_sd3.py writes and ComfyUI reads), and `sdlora inspect / convert / resize / merge /
extract`, the loader and the web UI on an SD3 base and its files, all on the tiny SD3."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from sdlora.lora import formats
from sdlora.lora.formats import Lora, Module

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
# every layer kind an SD3 LoRA can hold in kohya's layout: both streams' fused qkv, the outputs, SD3.5 Medium's
# second attention (block 0), an MLP and the last block's 2-chunk text-stream norm (block 1: rows swapped)
LAYERS = ("attn.to_q,attn.to_k,attn.to_v,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,attn.to_out.0,"
          "attn.to_add_out,attn2.to_q,attn2.to_k,attn2.to_v,ff.net.2,norm1_context.linear")


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory):
    from sdlora.tiny_sd3 import make_sd3

    return make_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3", arch="sd3")


@pytest.fixture(scope="module")
def trained(sd3_model, tmp_path_factory):
    """An SD3 run's output folder: transformer (LAYERS) and both CLIPs, alpha 4 at rank 2."""
    from helpers import T2I, fast_flags, run

    out = tmp_path_factory.mktemp("runs") / "sd3-style"
    r = run(T2I, fast_flags(sd3_model, out, train_data_dir=ROOT / "examples/data/pokemon", max_train_samples=4,
                            train_text_encoder=True, max_train_steps=2, rank=2, lora_alpha=4, lora_layers=LAYERS))
    assert "sd3-style.safetensors (the same LoRA in kohya's SD3 layout" in r.stderr
    return out


def _deltas(lora: Lora) -> dict:
    return {n: m.delta() for n, m in lora.modules.items()}


def _same(a: dict, b: dict, tol=1e-6):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


# ---------------------------------------------------------------- the second file

def test_sd3_run_writes_kohyas_sd3_layout_that_reads_back_onto_every_trained_layer(trained):
    from safetensors import safe_open
    from safetensors.torch import load_file

    kohya = trained / "sd3-style.safetensors"
    sd = load_file(kohya)
    # kohya's sd3_train_network names (lora_unet_ + SAI MMDiT path; lora_te1_ CLIP-L, lora_te2_ CLIP-G), q/k/v fused
    block0 = {f"lora_unet_joint_blocks_0_{p}" for p in ("x_block_attn_qkv", "context_block_attn_qkv",
                                                        "x_block_attn_proj", "context_block_attn_proj",
                                                        "x_block_attn2_qkv", "x_block_mlp_fc2")}
    names = {k.split(".")[0] for k in sd}
    assert block0 <= names and "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1" in names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_1_self_attn_v_proj" in names
    assert not any(k.startswith(("transformer.", "lora_unet_transformer_blocks")) for k in sd)
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert sd[f"{qkv}.lora_down.weight"].shape == (6, 32) and sd[f"{qkv}.lora_up.weight"].shape == (96, 6)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    meta = safe_open(kohya, "pt").metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora" and meta["ss_base_model_version"] == "sd3_m"
    diffusers_file = formats.load_lora(trained / "pytorch_lora_weights.safetensors")
    back = formats.load_lora(kohya)
    assert back.format == "kohya" and formats.family(back) == "SD3"
    _same(_deltas(back), _deltas(diffusers_file))  # every trained layer, the untrained last add_q_proj too
    card = (trained / "README.md").read_text()
    assert "`sd3-style.safetensors`" in card


def test_sd3_kohya_names_are_the_original_models_by_diffusers_own_single_file_converter():
    """Independent of sdlora's name table: the change the kohya file puts on each original (SAI) weight, converted by
    diffusers' own SD3 single-file converter, is the diffusers-layout change — every Linear/Conv2d of the MMDiT."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from sdlora.lora.formats.kohya import kohya_tensors
    from sdlora.tiny_sd3 import build

    transformer, g = build()["transformer"], torch.Generator().manual_seed(0)
    mods = {}
    for name, layer in transformer.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            w = layer.weight
            mods["transformer." + name] = Module(torch.randn(2, *w.shape[1:], generator=g) / 8,
                                                 torch.randn(w.shape[0], 2, *[1] * (w.dim() - 2), generator=g) / 8, 3.0)
    lora = Lora(mods)
    tensors, header = kohya_tensors(lora)
    sai = {}  # every original weight the file names (ComfyUI's rule: "lora_unet_" + its path, "." as "_")
    assert json.loads(header["sdlora_qkv_ranks"])["joint_blocks.0.x_block.attn.qkv"] == [2, 2, 2]
    _same(_deltas(formats.parse(tensors, {}, "<no header>")), _deltas(lora))  # kohya's own: split by the columns
    for key in {k.split(".")[0] for k in tensors}:
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * (
            float(tensors[f"{key}.alpha"]) / down.shape[0])
        sai[key.removeprefix("lora_unet_")] = delta
    paths = {p.replace(".", "_"): p for p in _sai_paths(len(transformer.transformer_blocks))}
    assert set(sai) == set(paths)
    checkpoint = {}
    for flat, delta in sai.items():
        checkpoint[paths[flat] + ".weight"] = delta
        checkpoint[paths[flat] + ".bias"] = torch.zeros(delta.shape[0])
    checkpoint["pos_embed"] = torch.zeros(1)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    want = _deltas(lora)
    assert {k.removesuffix(".weight") for k in converted if k.endswith(".weight")} == {n[12:] for n in want}
    for name, delta in want.items():
        assert (converted[name[12:] + ".weight"] - delta).abs().max() <= 1e-6, name


def _sai_paths(blocks: int) -> list[str]:
    """The original MMDiT's Linear/Conv2d paths for the tiny SD3 (SD3.5 Medium's layout: block 0 has attn2; the
    last block's text stream has no proj or mlp), as sd-scripts' sd3_models.MMDiT names them."""
    out = ["x_embedder.proj", "context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0",
           "y_embedder.mlp.2", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    for i in range(blocks):
        last = i == blocks - 1
        for stream in ("x_block", "context_block"):
            parts = ["attn.qkv", "adaLN_modulation.1"] + ([] if stream == "context_block" and last else
                                                          ["attn.proj", "mlp.fc1", "mlp.fc2"])
            parts += ["attn2.qkv", "attn2.proj"] if stream == "x_block" and i == 0 else []
            out += [f"joint_blocks.{i}.{stream}.{p}" for p in parts]
    return out


def test_inspect_names_sd3_and_which_loaders_read_each_file(trained):
    from sdlora import toolkit

    kohya = json.loads(toolkit.inspect_file(str(trained / "sd3-style.safetensors"), as_json=True))
    assert kohya["architecture"] == "SD3" and kohya["format"] == "kohya"
    read = {r["loader"]: r for r in kohya["loaders"]}
    n = kohya["target_modules"]
    for loader in ("ComfyUI", "Forge", "kohya"):  # all of it, at the trained scale (alpha is in the file)
        assert read[loader]["applied"] == n and read[loader]["rescaled"] == 0, loader
    assert read["diffusers"]["applied"] == 0  # diffusers' SD3 loader converts no kohya key
    text = toolkit.inspect_file(str(trained))
    assert "architecture:   SD3" in text
    theirs = json.loads(toolkit.inspect_file(str(trained / "pytorch_lora_weights.safetensors"), as_json=True))
    read = {r["loader"]: r for r in theirs["loaders"]}
    assert read["diffusers"]["applied"] == theirs["target_modules"] and read["diffusers"]["rescaled"] == 0
    # ComfyUI too, every layer at the trained scale: alpha 4 / rank 2 is folded into the up weights (no alpha to read)
    assert read["ComfyUI"]["applied"] == theirs["target_modules"] and read["ComfyUI"]["rescaled"] == 0


# ---------------------------------------------------------------- convert / resize / merge / extract

def test_convert_between_diffusers_and_kohya_layouts_round_trips(trained, tmp_path):
    from sdlora.cli import main

    src = trained / "pytorch_lora_weights.safetensors"
    assert main(["convert", str(src), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    assert main(["convert", str(tmp_path / "k.safetensors"), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    first, kohya, again = (formats.load_lora(p) for p in (src, tmp_path / "k.safetensors", tmp_path / "d"))
    assert kohya.format == "kohya" and again.format == "diffusers" and formats.family(again) == "SD3"
    _same(_deltas(kohya), _deltas(first))
    _same(_deltas(again), _deltas(first))


def test_resize_lowers_an_sd3_loras_rank_within_the_svd_bound(trained, tmp_path):
    from sdlora.lora.tools import resize

    lora = formats.load_lora(trained / "sd3-style.safetensors")
    small, kept = resize(lora, 1)
    assert {m.rank for m in small.modules.values()} == {1}
    for name, m in lora.modules.items():
        d, s = m.delta(), torch.linalg.svdvals(m.delta().flatten(1))
        err = (small.modules[name].delta() - d).norm()
        assert abs(err - s[1:].square().sum().sqrt()) <= 1e-5 * max(1.0, s[0].item()), name  # Eckart–Young
        assert abs(kept[name] - float((s[:1].square().sum() / s.square().sum().clamp_min(1e-30)).sqrt())) <= 1e-4
    from sdlora.cli import main

    assert main(["resize", str(trained / "sd3-style.safetensors"), str(tmp_path / "r1.safetensors"), "--rank", "1"]) == 0
    _same(_deltas(formats.load_lora(tmp_path / "r1.safetensors")), _deltas(small), tol=1e-5)


def test_merge_two_sd3_loras(trained, tmp_path):
    from sdlora.cli import main

    a = formats.load_lora(trained / "pytorch_lora_weights.safetensors")
    g = torch.Generator().manual_seed(1)
    other = Lora({n: Module(torch.randn(3, m.in_features, generator=g) / 10, torch.randn(m.out_features, 3, generator=g) / 10,
                            3.0) for n, m in list(a.modules.items())[::2]})
    formats.save_lora(other, tmp_path / "b.safetensors", "diffusers")
    assert main(["merge", str(trained / "sd3-style.safetensors"), f"{tmp_path / 'b.safetensors'}:0.5",
                 str(tmp_path / "m.safetensors"), "--to", "kohya"]) == 0
    merged = formats.load_lora(tmp_path / "m.safetensors")
    want = _deltas(a)
    for n, d in _deltas(other).items():
        want[n] = want[n] + 0.5 * d
    _same(_deltas(merged), want)


def test_extract_an_sd3_lora_from_a_fine_tuned_transformer(sd3_model, tmp_path):
    from diffusers import SD3Transformer2DModel

    from sdlora.cli import main

    tuned = tmp_path / "tuned"
    shutil.copytree(sd3_model, tuned)
    transformer = SD3Transformer2DModel.from_pretrained(tuned, subfolder="transformer")
    g = torch.Generator().manual_seed(2)
    changed = {}
    for path in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj", "proj_out"):
        w = transformer.get_submodule(path).weight
        changed["transformer." + path] = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) / 10
        w.data += changed["transformer." + path]
    transformer.save_pretrained(tuned / "transformer")
    assert main(["extract", "--base", str(sd3_model), "--tuned", str(tuned), str(tmp_path / "x"), "--rank", "2"]) == 0
    lora = formats.load_lora(tmp_path / "x")
    assert formats.family(lora) == "SD3"
    _same(_deltas(lora), changed, tol=1e-5)


# ---------------------------------------------------------------- loading on a base

def test_a_lora_of_another_family_on_an_sd3_base_is_one_line_naming_both(sd3_model, tiny_model, trained, tmp_path):
    from sdlora.errors import UserError
    from sdlora.pipeline import load_pipeline

    g = torch.Generator().manual_seed(3)
    sd1 = Lora({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k":
                Module(torch.randn(2, 768, generator=g), torch.zeros(32, 2), 2.0)})
    formats.save_lora(sd1, tmp_path / "sd1.safetensors", "kohya")
    with pytest.raises(UserError) as e:
        load_pipeline([str(tmp_path / "sd1.safetensors")], base=str(sd3_model), device="cpu", dtype="fp32")
    line = str(e.value)
    assert "\n" not in line and "SD 1.x" in line and "(SD3)" in line, line
    with pytest.raises(UserError) as e:  # and the other way round: the SD3 kohya file on an SD 1.x base
        load_pipeline([str(trained / "sd3-style.safetensors")], base=str(tiny_model), device="cpu", dtype="fp32")
    line = str(e.value)
    assert "\n" not in line and "LoRA for SD3" in line and "SD 1.x" in line, line


def test_the_kohya_file_draws_what_the_diffusers_file_draws(sd3_model, trained):
    import numpy as np

    from sdlora.pipeline import load_pipeline

    def draw(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red square", num_inference_steps=2, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    ours = load_pipeline([str(trained / "sd3-style.safetensors")], base=str(sd3_model), device="cpu", dtype="fp32")
    assert type(ours.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    theirs = load_pipeline([str(trained / "pytorch_lora_weights.safetensors")], base=str(sd3_model), device="cpu",
                           dtype="fp32")
    assert np.abs(draw(ours) - draw(theirs)).max() <= 1e-5


# ---------------------------------------------------------------- the web UI's Train, Generate and Tools tabs

def test_ui_tabs_take_an_sd3_base_and_its_files(sd3_model, trained, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    import numpy as np
    from conftest import make_images
    from PIL import Image

    from sdlora.recipes import RECIPES
    from sdlora.ui import generate_tab
    from sdlora.ui.tools_tab import tool_convert, tool_extract, tool_inspect, tool_merge, tool_resize
    from sdlora.ui.train_tab import MAIN_FLAGS, checked_flags, do_preview

    # Train: the form's flags are the command line's, and the preview reads the data against the SD3 base
    data, out = make_images(tmp_path / "data", n=2), tmp_path / "out"
    form = [str(sd3_model), "", str(data), "", str(out), "lora", "default", "--lora_blocks 1 --drop_t5"]
    args = RECIPES["text-to-image"].parse_args(checked_flags("text-to-image", False, str(out), *form,
                                                             *[""] * len(MAIN_FLAGS)))
    assert (args.pretrained_model_name_or_path, args.lora_blocks, args.drop_t5) == (str(sd3_model), "1", True)
    *_, summary = do_preview("text-to-image", *form, *[""] * len(MAIN_FLAGS))
    assert not summary.startswith("error"), summary
    assert not out.exists()
    # Generate: the kohya file on the SD3 base draws what sdlora's loader draws with the diffusers file
    monkeypatch.setattr(generate_tab, "served", str)
    slots = [str(trained / "sd3-style.safetensors"), 1.0] + [""] * (2 * generate_tab.LORA_SLOTS - 2)
    _, files, status = generate_tab.do_generate(str(sd3_model), "", "a red square", "", 0, 2, 5.0, 32, 32, "dpm++",
                                                "on", str(tmp_path / "gen"), *slots)
    assert status.startswith("wrote"), status
    from sdlora.pipeline import load_pipeline

    pipe = load_pipeline([str(trained / "pytorch_lora_weights.safetensors")], base=str(sd3_model), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    want = pipe("a red square", num_inference_steps=2, height=32, width=32, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.abs(np.asarray(Image.open(files[0]), dtype=np.float32) / 255 - want).max() <= 1.5 / 255
    # Tools
    assert "architecture:   SD3" in tool_inspect(str(trained / "sd3-style.safetensors"))
    assert tool_convert(str(trained), str(tmp_path / "k.safetensors"), "kohya").startswith("converted diffusers -> kohya")
    assert tool_resize(str(tmp_path / "k.safetensors"), str(tmp_path / "r.safetensors"), 1).splitlines()[-1].startswith("wrote")
    said = tool_merge(f"{trained / 'sd3-style.safetensors'}\n{tmp_path / 'r.safetensors'}:0.5", str(tmp_path / "m"), None)
    assert said.startswith("merged 2 LoRAs"), said
    said = tool_extract(str(sd3_model), str(sd3_model), "", str(tmp_path / "x"), 2, "diffusers")
    assert said.startswith("error:") and "no layer differs" in said, said


def test_sd3_samples_with_its_flow_match_scheduler_or_dpm_solver_on_flow_sigmas(sd3_model, tiny_model):
    import numpy as np

    from sdlora.errors import UserError
    from sdlora.pipeline import load_pipeline, set_scheduler

    pipe = load_pipeline(base=str(sd3_model), device="cpu", dtype="fp32")

    def draw(steps):
        return pipe("a red square", num_inference_steps=steps, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    euler, reference = draw(8), draw(100)
    set_scheduler(pipe, "dpm++-flow")
    config = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and config.use_flow_sigmas
    assert (config.prediction_type, config.flow_shift) == ("flow_prediction", 3.0)  # the base's shift
    dpm = draw(8)
    assert np.abs(dpm - euler).max() > 1e-4 and np.abs(dpm - reference).mean() < 0.01  # the same flow, solved
    set_scheduler(pipe, "dpm++")  # back to the base's own
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert np.array_equal(draw(8), euler)
    sd1 = load_pipeline(base=str(tiny_model), device="cpu", dtype="fp32")
    with pytest.raises(UserError, match="dpm\\+\\+-flow is for flow-matching bases"):
        set_scheduler(sd1, "dpm++-flow")
