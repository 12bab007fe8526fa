"""What a training run writes loads, unchanged, where people generate images — at the scale it was trained at.

Loaders, and how each is checked:
* diffusers: `pipe.load_lora_weights(dir)` (the diffusers file) and `pipe.load_lora_weights(<kohya file>)` draw
  the same images.
* LyCORIS (`lycoris-lora` from PyPI; `lycoris.kohya.create_network_from_weights` is the kohya-network loader
  that kohya's sd-scripts and A1111's LyCORIS support share): every module of the kohya file loads, and its
  weight change is the one trained (up @ down · alpha / rank).
* ComfyUI is not installable from a registry. Its loader (comfy/lora.py: `model_lora_keys_unet`,
  `model_lora_keys_clip`, `load_lora`) maps `lora_unet_<diffusers module path with "_" for ".">` and
  `lora_te_text_model_encoder_layers_<i>_<self_attn_q_proj|k|v|out_proj|mlp_fc1|mlp_fc2>`, and reads
  `<name>.lora_up.weight`, `<name>.lora_down.weight` and `<name>.alpha`; A1111/Forge use the same names.
  The key names are checked against that convention.
"""
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import conftest
from helpers import DREAMBOOTH, T2I, env, fast_flags, front_matter, lycoris_modules, run

# name: (script, extra flags, alpha, rank)
RUNS = {
    "unet": (T2I, {}, 4, 4),
    "text_encoder": (T2I, {"train_text_encoder": True}, 4, 4),
    "locon_alpha8": (T2I, {"target_modules": "to_q,to_k,to_v,to_out.0,conv1,conv2", "lora_alpha": 8}, 8, 4),
    "dreambooth": (DREAMBOOTH, {"instance_prompt": "a sks square"}, 4, 4),
}


@pytest.fixture(scope="module", params=list(RUNS))
def trained(request, tiny_model, tmp_path_factory):
    """A short run of a script with its defaults (plus the row's flags); a high LR so the LoRA shows."""
    script, extra, alpha, rank = RUNS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    data = conftest.make_images(tmp / "photos", n=4, captions=script is T2I)
    out = tmp / f"my-{request.param}-lora"
    key = "train_data_dir" if script is T2I else "instance_data_dir"
    run(script, fast_flags(tiny_model, out, **{key: data}, max_train_steps=3, learning_rate=5e-2, **extra))
    return request.param, out, alpha, rank


def kohya_file(out):
    return out / f"{out.name}.safetensors"


def trained_deltas(out, alpha, rank) -> dict:
    """{kohya module name: up @ down * alpha / rank} from the diffusers file's raw tensors, which hold alpha / rank
    folded into up (its header says alpha = rank for every component)."""
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        packed = json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(packed[f"{c}.lora_alpha"] == packed[f"{c}.r"] == rank for c in ("unet", "text_encoder") if f"{c}.r" in packed)
    pairs = {}
    for k, t in sd.items():
        m = re.fullmatch(r"(unet|text_encoder)\.(.+?)(?:_lora\.|\.lora\.|\.lora_linear_layer\.)(down|up)\.weight", k)
        comp, path, which = m.groups()
        path = path.replace(".processor.to_out", ".to_out.0").replace(".processor.", ".")
        name = ("lora_unet_" if comp == "unet" else "lora_te_") + path.replace(".", "_")
        pairs.setdefault(name, {})[which] = t.float()
    return {n: p["up"].flatten(1) @ p["down"].flatten(1) for n, p in pairs.items()}


def test_both_files_are_written_and_named_for_the_run(trained):
    _, out, _, _ = trained
    assert (out / "pytorch_lora_weights.safetensors").is_file() and kohya_file(out).is_file()
    card = (out / "README.md").read_text()
    assert f"`{kohya_file(out).name}`" in card and "ComfyUI/models/loras/" in card


def test_kohya_file_loads_whole_in_lycoris_at_the_trained_scale(trained, tiny_model, monkeypatch):
    from diffusers import StableDiffusionPipeline

    _, out, alpha, rank = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    loaded = lycoris_modules(kohya_file(out), pipe, monkeypatch)
    expected = trained_deltas(out, alpha, rank)
    assert sorted(loaded) == sorted(expected)  # every module of the file, nothing else
    for name, want in expected.items():
        got = loaded[name].get_diff_weight()[0].float().flatten(1)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), name
    assert max(w.abs().max().item() for w in expected.values()) > 1e-3  # a LoRA that does something


def kohya_deltas(out) -> dict:
    """{kohya module name: up @ down * alpha / rank} from the kohya file (alpha in its tensors)."""
    sd = load_file(kohya_file(out))
    return {k[:-len(".lora_down.weight")]: sd[k.replace("lora_down", "lora_up")].float().flatten(1)
            @ v.float().flatten(1) * (float(sd[k.replace("lora_down.weight", "alpha")]) / v.shape[0])
            for k, v in sd.items() if k.endswith(".lora_down.weight")}


def comfyui_patches(file, pipe):
    """({kohya module name: weight change}, keys not loaded) as ComfyUI's comfy/lora.py applies `file` to an SD 1.x
    model: its key map (`model_lora_keys_unet`: `lora_unet_<diffusers path>`, and `unet.<diffusers path>` with
    ".to_" spelled ".processor.to_" and to_out.0 as to_out; `model_lora_keys_clip`: `lora_te_text_model_…` and
    `text_encoder.text_model.encoder.layers.<i>.<q/k/v/out_proj, mlp.fc1/fc2>`), `load_lora`'s weight suffixes,
    and `<name>.alpha` (absent: scale 1.0). Built here from the live modules, independently of sdlora.lora.loaders."""
    sd = load_file(file)
    key_map = {}
    for n, m in pipe.unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            d = n.replace(".to_", ".processor.to_")
            d = d[:-2] if d.endswith(".to_out.0") else d
            for x in ("lora_unet_" + n.replace(".", "_"), "unet." + d):
                key_map[x] = "lora_unet_" + n.replace(".", "_")
    for i in range(pipe.text_encoder.config.num_hidden_layers):
        for c in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            name = f"lora_te_text_model_encoder_layers_{i}_{c.replace('.', '_')}"
            key_map[name] = key_map[f"text_encoder.text_model.encoder.layers.{i}.{c}"] = name
    suffixes = [(".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight")]
    patches, loaded = {}, set()
    for x, target in key_map.items():
        for up, down in suffixes:
            if x + up in sd:
                alpha = sd.get(x + ".alpha")
                scale = float(alpha) / sd[x + down].shape[0] if alpha is not None else 1.0
                patches[target] = sd[x + up].float().flatten(1) @ sd[x + down].float().flatten(1) * scale
                loaded |= {x + up, x + down, x + ".alpha"}
                break
    return patches, set(sd) - loaded


def test_both_files_load_whole_in_comfyui_at_the_trained_scale(trained, tiny_model):
    """The issue's trap: ComfyUI read 0 of the diffusers file's UNet layers (peft's names) and no alpha from it."""
    from diffusers import StableDiffusionPipeline

    _, out, _, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    want = kohya_deltas(out)
    for file in (out / "pytorch_lora_weights.safetensors", kohya_file(out)):
        patches, not_loaded = comfyui_patches(file, pipe)
        assert not not_loaded, sorted(not_loaded)[:3]  # ComfyUI logs "lora key not loaded: <key>" for each
        assert sorted(patches) == sorted(want), file.name
        assert all(torch.allclose(patches[n], want[n], rtol=1e-5, atol=1e-7) for n in want), file.name


def test_sdlora_reads_the_kohya_file_at_the_trained_scale(trained):
    from sdlora.lora import formats

    _, out, alpha, rank = trained
    lora = formats.load_lora(kohya_file(out))
    got = {("lora_unet_" if n.startswith("unet.") else "lora_te_") + n.split(".", 1)[1].replace(".", "_"):
           m.delta().flatten(1) for n, m in lora.modules.items()}
    expected = trained_deltas(out, alpha, rank)
    assert sorted(got) == sorted(expected)
    assert all(torch.allclose(got[n], expected[n], rtol=1e-5, atol=1e-7) for n in expected)


def _images(pipe, source=None):
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if source is not None:
        pipe.load_lora_weights(str(source))
    g = torch.Generator().manual_seed(0)
    return pipe("a red square", num_inference_steps=3, generator=g, output_type="np").images


def test_kohya_file_draws_the_same_images_in_diffusers(trained, tiny_model):
    from diffusers import StableDiffusionPipeline

    _, out, _, _ = trained
    load = lambda: StableDiffusionPipeline.from_pretrained(tiny_model)  # noqa: E731
    plain, reference, kohya = _images(load()), _images(load(), out), _images(load(), kohya_file(out))
    assert abs(reference - plain).max() > 1e-2  # the LoRA visibly changes the image ...
    assert abs(reference - kohya).max() <= 1e-5  # ... and both files change it the same way


def test_kohya_keys_follow_comfyui_and_a1111_names(trained, tiny_model):
    from diffusers import UNet2DConditionModel

    _, out, alpha, _ = trained
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    unet_names = {"lora_unet_" + n.replace(".", "_") for n, m in unet.named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    te_name = re.compile(r"lora_te_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])")
    sd = load_file(kohya_file(out))
    modules = {}
    for key in sd:
        name, _, part = key.partition(".")
        assert part in ("lora_down.weight", "lora_up.weight", "alpha"), key
        assert name in unet_names or te_name.fullmatch(name), key
        modules.setdefault(name, set()).add(part)
    assert all(parts == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in modules.values())
    assert {sd[f"{n}.alpha"].numel() for n in modules} == {1}
    assert {float(sd[f"{n}.alpha"]) for n in modules} == {float(alpha)}  # alpha travels in the tensors


def test_headers_carry_the_training_facts_viewers_show(trained):
    kind, out, alpha, rank = trained
    for f in (out / "pytorch_lora_weights.safetensors", kohya_file(out)):
        with safe_open(str(f), "pt") as h:
            meta = h.metadata()
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.resolution"] == "32x32"
        assert meta["modelspec.title"] == out.name and re.fullmatch(r"\d{4}-\d\d-\d\d", meta["modelspec.date"])
        assert meta["ss_network_dim"] == str(rank) and meta["ss_network_alpha"] == str(alpha)
        assert list(json.loads(meta["ss_dataset_dirs"])) == ["photos"]  # a folder name, never a local path
        assert meta.get("modelspec.trigger_phrase") == ("a sks square" if kind == "dreambooth" else None)


def test_model_card_snippet_runs_and_links_only_what_exists(trained, tiny_model):
    _, out, _, _ = trained
    card = (out / "README.md").read_text()
    assert "github.com/sdlora" not in card and "huggingface.co" not in card  # a local base: nothing to link
    assert "| dataset | photos |" in card and str(out.parent) not in card.split("## Training settings")[1]
    assert front_matter(out / "README.md")["base_model"] == str(tiny_model)
    code = card.split("```python\n")[1].split("```")[0]
    r = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0 and (out / "out.png").is_file(), r.stderr[-2000:]


def test_card_for_the_bundled_model_uses_sdlora_to_load_it(tmp_path):
    """diffusers cannot resolve `sdlora-tiny`, and it is not on the Hub: the card names it and shows sdlora's call."""
    data = conftest.make_images(tmp_path / "d", n=2)
    out = tmp_path / "tiny-style"
    run(T2I, fast_flags("sdlora-tiny", out, train_data_dir=data, max_train_steps=1))
    card = (out / "README.md").read_text()
    assert "huggingface.co" not in card and 'from_pretrained("sdlora-tiny")' not in card
    assert "`sdlora-tiny` (the tiny model bundled with sdlora)" in card
    code = card.split("```python\n")[1].split("```")[0]
    assert 'load_pipeline(["."])' in code
    r = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 0 and (out / "out.png").is_file(), r.stderr[-2000:]
