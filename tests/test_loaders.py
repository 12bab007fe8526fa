"""`sdlora inspect`'s per-loader table (sdlora/lora/loaders.py) and the diffusers file's layout (formats.to_shared).

diffusers is installed, so its row is checked against what `load_lora_weights` really does to a tiny pipeline.
ComfyUI, A1111/Forge and kohya's scripts are not installable from a registry: their rows are checked against the
key conventions read from their sources (see loaders.py), on hand-made files in each layout.
"""
import copy
import itertools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora.lora import formats, loaders
from sdlora.lora.formats import Lora, Module

torch.set_num_threads(1)

# (path, rank, alpha): attention, 1x1 conv, LoCon 3x3 conv, feed-forward, text encoder (attention and MLP)
LAYERS = [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, 8.0),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0", 4, 4.0),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", 2, 8.0),
    ("unet.up_blocks.1.attentions.0.proj_in", 4, 2.0),
    ("unet.down_blocks.0.resnets.0.conv1", 3, 6.0),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 4, 8.0),
    ("text_encoder.text_model.encoder.layers.0.self_attn.out_proj", 4, 8.0),
    ("text_encoder.text_model.encoder.layers.1.mlp.fc1", 2, 2.0),
]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_model))


def _layer(pipe, name):
    comp, path = name.split(".", 1)
    return getattr(pipe, comp).get_submodule(formats.live_path(comp, path))


def make_lora(pipe, layers=LAYERS, dora=False) -> Lora:
    g = torch.Generator().manual_seed(0)
    mods = {}
    for name, r, alpha in layers:
        w = _layer(pipe, name).weight
        kernel = list(w.shape[2:])
        down = torch.randn(r, w.shape[1], *kernel, generator=g) * 0.3
        up = torch.randn(w.shape[0], r, *([1, 1] if kernel else []), generator=g) * 0.3
        mag = w.detach().flatten(1).norm(dim=1) * 1.2 if dora else None
        mods[name] = Module(down, up, alpha, mag)
    return Lora(mods)


def diffusers_really(pipe, file, lora):
    """(error, layers applied, layers applied at the file's scale with their DoRA magnitude) by load_lora_weights."""
    name_ = f"a{next(_ADAPTERS)}"  # a fresh name: a refused load may leave its adapter half-made in some model
    try:
        pipe.load_lora_weights(str(file), adapter_name=name_)
    except Exception as e:  # noqa: BLE001 - which error is the loader's business; that it refused is the fact
        return type(e).__name__, 0, 0
    applied = exact = 0
    for name, m in lora.modules.items():
        layer = _layer(pipe, name)
        if name_ not in getattr(layer, "lora_A", {}):
            continue
        applied += 1
        got = layer.lora_B[name_].weight.flatten(1) @ layer.lora_A[name_].weight.flatten(1) * layer.scaling[name_]
        ok = torch.allclose(got, m.up.flatten(1) @ m.down.flatten(1) * (m.alpha / m.rank), atol=1e-5)
        if m.magnitude is not None:
            mag = getattr(layer, "lora_magnitude_vector", {})
            ok = ok and name_ in mag and torch.allclose(mag[name_].weight.flatten(), m.magnitude, atol=1e-6)
        exact += ok
    pipe.delete_adapters(name_)
    return None, applied, exact


_ADAPTERS = itertools.count()


def _files(pipe, tmp):
    """name -> (file, sdlora's reading of it): sdlora's writers and hand-made spellings of the same LoRA."""
    lora = make_lora(pipe)
    out = {}
    for fmt in ("diffusers", "kohya"):
        out[fmt] = formats.save_lora(lora, tmp / f"{fmt}.safetensors", fmt)
    # the spelling sdlora wrote before (and peft/diffusers' own scripts write): peft keys, alpha in the header
    t, header = formats.diffusers_tensors(lora)
    save_file(t, tmp / "peft_keys.safetensors", header)
    out["peft_keys"] = tmp / "peft_keys.safetensors"
    # kohya with its own alpha per layer (sdlora writes one alpha per file; other trainers do not)
    k = {}
    for name, m in lora.modules.items():
        comp, path = name.split(".", 1)
        stem = ("lora_unet_" if comp == "unet" else "lora_te_") + path.replace(".", "_")
        k |= {f"{stem}.lora_down.weight": m.down, f"{stem}.lora_up.weight": m.up, f"{stem}.alpha": torch.tensor(m.alpha)}
    save_file(k, tmp / "kohya_alphas.safetensors")
    out["kohya_alphas"] = tmp / "kohya_alphas.safetensors"
    # diffusers keys plus ComfyUI's .alpha tensors: diffusers refuses it
    save_file({**load_file(out["diffusers"]), "unet.x.alpha": torch.tensor(1.0)}, tmp / "alpha.safetensors")
    out["with_alpha"] = tmp / "alpha.safetensors"
    dora = make_lora(pipe, dora=True)
    for fmt in ("diffusers", "kohya"):
        out[f"dora_{fmt}"] = formats.save_lora(dora, tmp / f"dora_{fmt}.safetensors", fmt)
    return out


CASES = ["diffusers", "kohya", "peft_keys", "kohya_alphas", "with_alpha", "dora_diffusers", "dora_kohya"]


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    return _files(pipe, tmp_path_factory.mktemp("loaders"))


@pytest.mark.parametrize("case", CASES)
def test_diffusers_row_is_what_load_lora_weights_does(pipe, files, case):
    file = files[case]
    lora = formats.load_lora(file)
    row = loaders.read_file(file, lora)[0]
    assert row.loader == "diffusers"
    error, applied, exact = diffusers_really(pipe, file, lora)
    assert (row.error is not None, row.applied) == (error is not None, applied), (row, error)
    if error is None:
        assert row.applied - row.rescaled - row.no_magnitude == exact, row
    # per-layer kohya alphas: diffusers keeps only UNet layers' outside attention, the rest get the most common one
    assert row.rescaled == (2 if case == "kohya_alphas" else 0)
    assert row.no_magnitude == (8 if case == "dora_kohya" else 0)  # it drops dora_scale (with a warning)


def test_inspect_prints_the_table_and_one_warning_line(files, capsys):
    from sdlora.cli import main

    assert main(["inspect", str(files["peft_keys"])]) == 0
    out = capsys.readouterr().out
    assert "  ComfyUI    6 of 8 layers, scale 1 (no alpha read); 5 at another scale than the file's" in out
    assert "  A1111      none of 8 layers" in out and "  diffusers  8 of 8 layers, scales 0.5 to 4" in out
    warn = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "ComfyUI (6 of 8 layers, 5 rescaled)" in warn[0] and "--to kohya" in warn[0]
    assert main(["inspect", str(files["kohya"]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["loaders"]
    assert [(r["loader"], r["applied"], r["total"], r["rescaled"]) for r in rows] == \
        [(n, 8, 8, 0) for n in ("diffusers", "ComfyUI", "Forge", "A1111", "kohya")]


def test_sdlora_files_are_whole_and_exact_where_promised(files):
    rows = {f: {r.loader: r for r in loaders.read_file(files[f], formats.load_lora(files[f]))}
            for f in ("diffusers", "kohya", "peft_keys", "dora_diffusers")}
    # the diffusers file: every layer in diffusers and ComfyUI/Forge, at the file's scale (folded into the weights)
    assert all(rows["diffusers"][n].exact for n in ("diffusers", "ComfyUI", "Forge"))
    assert rows["diffusers"]["A1111"].applied == rows["diffusers"]["kohya"].applied == 0
    assert all(r.exact for r in rows["kohya"].values())  # the kohya file: everywhere
    # the old spelling: ComfyUI misses the attention layers and reads no alpha (the "silently partial")
    old = rows["peft_keys"]["ComfyUI"]
    assert (old.applied, old.total, old.alpha_read) == (6, 8, False) and old.rescaled == 5
    dora = rows["dora_diffusers"]
    assert dora["diffusers"].exact and dora["ComfyUI"].applied == 8 and dora["ComfyUI"].no_magnitude == 8


def test_each_loaders_names_on_hand_made_files(sdxl_model, tmp_path):
    """The key conventions read from each loader's source, one spelling at a time."""
    from diffusers import StableDiffusionXLPipeline

    xl = StableDiffusionXLPipeline.from_pretrained(str(sdxl_model))
    layers = [("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2, 4.0),
              ("unet.up_blocks.0.upsamplers.0.conv", 2, 4.0),
              ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 2, 4.0),
              ("text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj", 2, 4.0)]
    lora = make_lora(xl, layers)
    lora.metadata["ss_base_model_version"] = "sdxl_base_v1-0"

    def rows(tensors):
        save_file(tensors, tmp_path / "f.safetensors")
        file = tmp_path / "f.safetensors"
        read = formats.load_lora(file)
        got = {r.loader: (r.applied, r.rescaled) for r in loaders.read_file(file, read)}
        error, applied, exact = diffusers_really(xl, file, read)
        assert got["diffusers"] == ((0, 0) if error else (applied, applied - exact)), (got, error)
        return got

    def kohya(prefix_te, unet_names, out_proj=False):
        out = {}
        mods = dict(lora.modules)
        if out_proj:  # what diffusers' text-encoder conversion needs (sdlora's kohya writer adds a zero one)
            for te in ("text_encoder", "text_encoder_2"):
                mods[f"{te}.text_model.encoder.layers.0.self_attn.out_proj"] = copy.deepcopy(mods[layers[2][0]])
        for name, m in mods.items():
            comp, path = name.split(".", 1)
            if comp == "unet":
                stem = "lora_unet_" + unet_names(path).replace(".", "_")
            else:
                stem = {"text_encoder": prefix_te, "text_encoder_2": "lora_te2_"}[comp] + path.replace(".", "_")
            out |= {f"{stem}.lora_down.weight": m.down, f"{stem}.lora_up.weight": m.up, f"{stem}.alpha": torch.tensor(4.0)}
        return out

    ldm = lambda p: formats.swap_prefix(p, formats.sgm_pairs(), reverse=True)  # noqa: E731
    # kohya's own SDXL spelling: original UNet names, lora_te1_. A1111 patches SDXL's OpenCLIP attention only with
    # all of q/k/v/out, so the lone v_proj is skipped there. diffusers cannot tell the text encoders' kohya keys'
    # type without an out_proj key, and refuses the file.
    got = rows(kohya("lora_te1_", ldm))
    assert got["ComfyUI"] == got["kohya"] == (4, 0) and got["A1111"] == (3, 0) and got["diffusers"] == (0, 0)
    got = rows(kohya("lora_te1_", ldm, out_proj=True))
    assert got["diffusers"] == got["ComfyUI"] == (6, 0)
    # diffusers' names under lora_unet_ and lora_te_ on SDXL: ComfyUI and diffusers map them all; kohya's SDXL
    # network knows only original UNet names and lora_te1_/lora_te2_ (its 2: text_encoder_2's v and out); A1111
    # reads lora_te_ as SD 1.x's encoder, misplaces SDXL's first upsampler by its SD 1.x block arithmetic and
    # still wants all of text_encoder_2's q/k/v/out (its 1: the UNet's to_q)
    got = rows(kohya("lora_te_", lambda p: p, out_proj=True))
    assert got["ComfyUI"] == got["diffusers"] == (6, 0) and got["kohya"] == (2, 0) and got["A1111"] == (1, 0)
