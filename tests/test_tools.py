"""inspect / convert / resize / merge / extract through the CLI entry point, checked against explicit math."""
import json

import pytest
import torch
from safetensors.torch import load_file
from test_formats import LAYERS, assert_same_deltas, rich_lora

from sdlora.cli import main
from sdlora.lora import formats
from sdlora.lora.tools import extract, merge, resize
from sdlora.pipeline import load_base
from sdlora.testing import demo_lora

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_base(tiny_model)


@pytest.fixture
def lora_file(pipe, tmp_path):
    return formats.save_lora(rich_lora(pipe), tmp_path / "in" / "lora.safetensors", "kohya")


def test_inspect_reports_the_file(tiny_model, tmp_path, capsys):
    file = demo_lora(tmp_path / "lora", base=tiny_model, rank=4, alpha=8)
    assert main(["inspect", str(tmp_path / "lora"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "diffusers" and d["base_model"] == str(tiny_model)
    assert d["architecture"] == "SD 1.x (cross-attention dim 32)"  # the tiny base: SD 1.x layout, narrow
    # alpha 8 / rank 4 is folded into the up weights (so ComfyUI applies it too): the file says alpha = rank
    assert d["ranks"] == [4] and d["alphas"] == [4.0] and d["target_modules"] == 32
    assert d["metadata"]["ss_network_alpha"] == "8"
    assert d["parameters"] == sum(t.numel() for t in load_file(file).values())
    assert d["dtype"] == ["float32"] and d["size_bytes"] == file.stat().st_size
    assert d["metadata"]["ss_network_dim"] == "4"
    assert main(["inspect", str(file)]) == 0
    text = capsys.readouterr().out
    assert "format:         diffusers" in text and "rank(s):        4" in text and "ss_sd_model_name" in text


def test_inspect_never_prints_tokens(pipe, tmp_path, capsys):
    lora = rich_lora(pipe)
    lora.metadata["ss_note"] = "pushed with hf_" + "a" * 30
    formats.save_lora(lora, tmp_path / "t.safetensors", "kohya")
    main(["inspect", str(tmp_path / "t.safetensors")])
    assert "a" * 30 not in capsys.readouterr().out


def test_convert_between_all_formats_and_dtype(lora_file, tmp_path):
    original = formats.load_lora(lora_file)
    src = lora_file
    for fmt in ("peft", "diffusers", "kohya"):
        out = tmp_path / f"as-{fmt}"
        assert main(["convert", str(src), str(out), "--to", fmt]) == 0
        back = formats.load_lora(out)
        assert back.format == fmt
        assert_same_deltas(original, back, tol=1e-6)
        src = out
    assert main(["convert", str(lora_file), str(tmp_path / "h.safetensors"), "--to", "diffusers", "--dtype", "fp16"]) == 0
    half = formats.load_lora(tmp_path / "h.safetensors")
    assert {m.down.dtype for m in half.modules.values()} == {torch.float16}
    assert_same_deltas(original, half, tol=1e-2)


@pytest.mark.parametrize("argv", [
    ["convert", "{in}", "{in}", "--to", "kohya"],
    ["convert", "{in}", "{dir}", "--to", "diffusers"],
    ["resize", "{in}", "{in}", "--rank", "1"],
    ["merge", "{in}", "{in}:0.5", "{in}"],
])
def test_tools_never_overwrite_their_input(lora_file, argv, capsys):
    before = lora_file.read_bytes()
    argv = [a.replace("{in}", str(lora_file)).replace("{dir}", str(lora_file.parent)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "refusing to overwrite" in err and "\n" not in err
    assert lora_file.read_bytes() == before and sorted(p.name for p in lora_file.parent.iterdir()) == ["lora.safetensors"]


def _best_rank(delta, r):
    u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).reshape(delta.shape), float((s[:r].square().sum() / s.square().sum()).sqrt())


def test_resize_is_the_best_low_rank_approximation(lora_file, tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    assert main(["resize", str(lora_file), str(out), "--rank", "2"]) == 0
    printed = capsys.readouterr().out
    original, small = formats.load_lora(lora_file), formats.load_lora(out)
    for name, m in original.modules.items():
        expected, share = _best_rank(m.delta(), 2)
        assert small.modules[name].rank == min(2, m.rank)
        assert torch.allclose(small.modules[name].delta(), expected, atol=1e-5), name
        assert f"{share * 100:7.2f}%  {name}" in printed
    assert "norm kept" in printed


def test_merge_is_the_weighted_sum(pipe, tmp_path, capsys):
    a = formats.save_lora(rich_lora(pipe, seed=1), tmp_path / "a.safetensors", "kohya")
    b_lora = rich_lora(pipe, seed=2, layers=LAYERS[:3] + [("unet.conv_in", 2, 2.0)])
    b = formats.save_lora(b_lora, tmp_path / "b.safetensors", "diffusers")
    assert main(["merge", f"{a}:0.5", f"{b}:-2", str(tmp_path / "m.safetensors")]) == 0
    A, B, M = (formats.load_lora(p) for p in (a, b, tmp_path / "m.safetensors"))
    assert M.format == "kohya" and set(M.modules) == set(A.modules) | set(B.modules)
    for name, m in M.modules.items():
        expected = 0.5 * A.modules[name].delta() if name in A.modules else 0
        expected = expected + (-2 * B.modules[name].delta() if name in B.modules else 0)
        assert torch.allclose(m.delta(), expected, atol=1e-5), name
    merged, _ = merge([(A, 0.5), (B, -2)], rank=3)
    for name, m in merged.modules.items():
        assert torch.allclose(m.delta(), _best_rank(M.modules[name].delta(), 3)[0], atol=1e-5), name


def test_extract_recovers_a_known_difference(tiny_model, tmp_path, capsys):
    """tuned = base + a rank-2 change on some UNet and text-encoder layers: extract finds exactly those."""
    from diffusers import StableDiffusionPipeline

    tuned_pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    change = rich_lora(tuned_pipe, seed=5, layers=[(n, 2, 2.0) for n, _, _ in LAYERS])
    for name, m in change.modules.items():
        comp, path = name.split(".", 1)
        getattr(tuned_pipe, comp).get_submodule(formats.live_path(comp, path)).weight.data += m.delta()
    tuned_pipe.save_pretrained(str(tmp_path / "tuned"))
    out = tmp_path / "x.safetensors"
    assert main(["extract", "--base", str(tiny_model), "--tuned", str(tmp_path / "tuned"), "--rank", "2",
                 str(out)]) == 0
    got = formats.load_lora(out)
    assert set(got.modules) == set(change.modules) and got.base_model == str(tiny_model)
    assert_same_deltas(change, got, tol=1e-5)
    assert "100.00%" in capsys.readouterr().out
    low, kept = extract(tiny_model, tmp_path / "tuned", rank=1, text_encoder=False)
    assert all(n.startswith("unet.") for n in low.modules) and all(0.5 < k < 1 for k in kept.values())
    assert resize(got, 1)[1].keys() == got.modules.keys()


@pytest.mark.parametrize("argv", [
    ["convert", "{in}", "{out}", "--to", "diffusers"],
    ["resize", "{in}", "{out}", "--rank", "1"],
    ["merge", "{in}", "{in}:0.5", "{out}"],
], ids=["convert", "resize", "merge"])
def test_tools_replace_an_existing_output_only_with_overwrite(lora_file, tmp_path, argv, capsys):
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"the user's own file")
    args = [a.replace("{in}", str(lora_file)).replace("{out}", str(out)) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out} exists; choose another name or pass --overwrite"
    assert out.read_bytes() == b"the user's own file"
    assert main([*args, "--overwrite"]) == 0
    assert formats.load_lora(out).modules and sorted(p.name for p in tmp_path.iterdir()) == ["in", "mine.safetensors"]
    # a folder output where a file is: one line, nothing written (even with --overwrite)
    args = [a.replace("{in}", str(lora_file)).replace("{out}", str(out.with_suffix(""))) for a in argv]
    out.rename(out.with_suffix(""))
    assert main([*args, "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {out.with_suffix('')} exists and is a file, not a folder; "
                                               "choose another name (a name ending in .safetensors writes a single file)")
