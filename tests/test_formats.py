"""LoRA formats: detection, lossless round trips, interop with diffusers' and peft's own loaders, bad files."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora.errors import UserError
from sdlora.lora import formats
from sdlora.lora.formats import Lora, Module

torch.set_num_threads(1)

# (path, rank, alpha): linear, 1x1 conv (proj_in), 3x3 conv (LoCon), feed-forward, text encoder.
LAYERS = [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, 8.0),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 4, 4.0),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", 2, 8.0),
    ("unet.up_blocks.1.attentions.0.proj_in", 4, 8.0),
    ("unet.down_blocks.0.resnets.0.conv1", 3, 1.5),
    ("unet.mid_block.resnets.0.time_emb_proj", 4, 8.0),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 4, 8.0),
    ("text_encoder.text_model.encoder.layers.1.mlp.fc1", 2, 2.0),
]


def rich_lora(pipe, seed=0, layers=LAYERS, std=0.2) -> Lora:
    """A LoRA over every kind of layer sdlora supports, shaped for `pipe`, with mixed ranks and alphas."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, r, alpha in layers:
        comp, path = name.split(".", 1)
        w = getattr(pipe, comp).get_submodule(formats.live_path(comp, path)).weight
        kernel = list(w.shape[2:])
        down = torch.randn(r, w.shape[1], *kernel, generator=g) * std
        up = torch.randn(w.shape[0], r, *([1, 1] if kernel else []), generator=g) * std
        mods[name] = Module(down, up, alpha)
    return Lora(mods, {"ss_network_dim": "4"}, base_model="some/base")


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from sdlora.pipeline import load_base

    return load_base(tiny_model)


def assert_same_deltas(a: Lora, b: Lora, tol=1e-6):
    assert sorted(a.modules) == sorted(b.modules)
    for name, m in a.modules.items():
        assert torch.allclose(m.delta(), b.modules[name].delta(), atol=tol), name


def safe_metadata(file) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.metadata()


def test_trainer_file_is_read_with_alpha_and_base_from_the_card(tiny_model, tmp_path):
    from sdlora.testing import demo_lora

    file = demo_lora(tmp_path / "lora", base=tiny_model, rank=4, alpha=8)
    lora = formats.load_lora(tmp_path / "lora")
    assert lora.format == "diffusers" and lora.base_model == str(tiny_model)
    # alpha 8 / rank 4 travels folded into the up weights (formats.to_shared), so the file says alpha = rank
    assert len(lora.modules) == 32 and {m.alpha for m in lora.modules.values()} == {4.0}
    raw = load_file(file)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    m = lora.modules[name]
    stem = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    assert torch.equal(m.down, raw[stem + ".down.weight"]) and m.rank == 4
    assert json.loads(safe_metadata(file)["lora_adapter_metadata"])["unet.lora_alpha"] == 4
    assert safe_metadata(file)["ss_network_alpha"] == "8"  # the trained alpha, as kohya's tools record it
    # the card wins, but ss_sd_model_name alone is enough
    (tmp_path / "lora" / "README.md").unlink()
    assert formats.load_lora(file).base_model == str(tiny_model)


def test_file_config_holds_only_what_differs_from_peft_defaults(tiny_model, tmp_path):
    """diffusers builds LoraConfig(**the file's entries): an entry a user's older peft lacks (peft 0.22's
    astra_config: null, 0.18's peft_version) would be a TypeError there, so only the core entries and those that
    differ from peft's defaults are written, and they rebuild the same config."""
    from dataclasses import fields

    from peft import LoraConfig

    from sdlora.lora.inject import CORE_CONFIG, file_config
    from sdlora.testing import demo_lora

    meta = json.loads(safe_metadata(demo_lora(tmp_path / "lora", base=tiny_model, rank=4, alpha=8))
                      ["lora_adapter_metadata"])
    assert {k.removeprefix("unet.") for k in meta} == set(CORE_CONFIG)
    trained = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], use_dora=True, lora_dropout=0.1)
    written = file_config(trained)
    assert set(written) == set(CORE_CONFIG) | {"use_dora", "lora_dropout"}
    rebuilt, full = LoraConfig(**written), LoraConfig(**{**trained.to_dict(), "init_lora_weights": True})
    assert all(getattr(rebuilt, f.name) == getattr(full, f.name) for f in fields(LoraConfig))


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_round_trip_is_lossless(pipe, tmp_path, fmt):
    lora = rich_lora(pipe)
    out = tmp_path / "out"
    formats.save_lora(lora, out, fmt)
    back = formats.load_lora(out)
    assert back.format == fmt and back.base_model == "some/base"
    assert_same_deltas(lora, back)


def test_kohya_keys_are_the_a1111_spelling(pipe, tmp_path):
    formats.save_lora(rich_lora(pipe), tmp_path / "k.safetensors", "kohya")
    keys = load_file(tmp_path / "k.safetensors").keys()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert formats.unmangle("up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0") == \
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"


def _image(pipe, lora_source=None):
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    if lora_source is not None:
        pipe.load_lora_weights(lora_source)
    out = pipe("a red square", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images


@pytest.mark.parametrize("original", ["trainer", "trainer_te", "te_qv", "locon"])
def test_kohya_written_by_sdlora_loads_in_diffusers_with_identical_images(tiny_model, pipe, tmp_path, original):
    """trainer: attention LoRA exactly as the trainer writes it; trainer_te: plus its text-encoder LoRA;
    te_qv: a q/v-only text encoder (needs sdlora's zero out_proj padding); locon: ff/proj/3x3 conv, mixed ranks."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from sdlora.testing import demo_lora

    if original == "locon":
        unet_layers = [(n, r, a) for n, r, a in LAYERS if n.startswith("unet.")]
        formats.save_lora(rich_lora(pipe, layers=unet_layers, std=0.5), tmp_path / "orig", "diffusers")
    else:
        te = None if original == "trainer" else CLIPTextModel.from_pretrained(str(tiny_model), subfolder="text_encoder")
        demo_lora(tmp_path / "orig", base=tiny_model, rank=4, alpha=8, strength=1.0, text_encoder=te,
                  text_targets=["q_proj", "v_proj"] if original == "te_qv" else None)
    lora = formats.load_lora(tmp_path / "orig")
    kohya = formats.save_lora(lora, tmp_path / "k.safetensors", "kohya")
    back = formats.load_lora(kohya)
    assert back.format == "kohya"
    assert_same_deltas(lora, back)  # any padding is dropped again on reading

    load = lambda: StableDiffusionPipeline.from_pretrained(str(tiny_model))  # noqa: E731
    plain = _image(load())
    reference = _image(load(), str(tmp_path / "orig"))
    converted = _image(load(), str(kohya))
    assert abs(reference - plain).max() > 1e-2  # the LoRA visibly changes the image
    assert abs(reference - converted).max() <= 1e-5


def test_mlp_only_text_encoder_lora_loads_in_diffusers_and_sdlora(tiny_model, pipe, tmp_path):
    """diffusers cannot infer the type of a text-encoder LoRA without attention keys; both our kohya file
    (zero out_proj padding) and sdlora's own loader get the exact weight change in anyway."""
    from diffusers import StableDiffusionPipeline

    from sdlora.pipeline import Adapters

    layers = [(n, r, a) for n, r, a in LAYERS if n.endswith("mlp.fc1")]
    lora = rich_lora(pipe, layers=layers)
    kohya = formats.save_lora(lora, tmp_path / "k.safetensors", "kohya")
    assert any("out_proj" in k for k in load_file(kohya))  # the padding diffusers needs ...
    assert sorted(formats.load_lora(kohya).modules) == sorted(lora.modules)  # ... is invisible to sdlora
    name = layers[0][0]
    for load in ("diffusers", "sdlora"):
        fresh = StableDiffusionPipeline.from_pretrained(str(tiny_model))
        if load == "diffusers":
            fresh.load_lora_weights(str(kohya), adapter_name="k")
        else:
            Adapters(fresh).add([(kohya, 1.0)])
        layer = fresh.text_encoder.get_submodule(formats.live_path("text_encoder", name.split(".", 1)[1]))
        adapter = next(iter(layer.lora_A))
        assert torch.allclose(layer.get_delta_weight(adapter), lora.modules[name].delta(), atol=1e-6), load


def test_diffusers_and_peft_files_load_in_their_own_libraries(pipe, tmp_path):
    """Our diffusers file through diffusers' loader and our peft folder through peft give the exact deltas."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    lora = rich_lora(pipe)
    formats.save_lora(lora, tmp_path / "d.safetensors", "diffusers")
    pipe.load_lora_weights(str(tmp_path / "d.safetensors"), adapter_name="d")
    try:
        for name, m in lora.modules.items():
            comp, path = name.split(".", 1)
            layer = getattr(pipe, comp).get_submodule(formats.live_path(comp, path))
            assert torch.allclose(layer.get_delta_weight("d"), m.delta(), atol=1e-6), name
    finally:
        pipe.delete_adapters("d")

    formats.save_lora(lora, tmp_path / "p", "peft")
    unet = copy.deepcopy(pipe.unet)
    cfg = LoraConfig.from_pretrained(str(tmp_path / "p"))
    inject_adapter_in_model(cfg, unet)
    set_peft_model_state_dict(unet, load_file(tmp_path / "p" / "adapter_model.safetensors"))
    for name, m in lora.modules.items():
        if name.startswith("unet."):
            layer = unet.get_submodule(name[5:])
            assert torch.allclose(layer.get_delta_weight("default"), m.delta(), atol=1e-6), name
    assert (tmp_path / "p" / "text_encoder" / "adapter_config.json").is_file()


def _good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"unet.a.lora.down.weight": torch.ones(2, 3), "unet.a.lora.up.weight": torch.ones(3, 2)}, str(path))
    return path


@pytest.mark.parametrize("damage,expected", [
    ("truncate", "not a valid safetensors file"),
    ("header", "not a valid safetensors file"),
    ("not_lora", "not a LoRA file"),
    ("unknown", "unknown LoRA key layout"),
    ("half_pair", "has only its down weight (no up weight)"),
    ("3d", "mismatched down/up"),
])
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, damage, expected):
    path = _good_file(tmp_path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "header":
        path.write_bytes(b"\xff" * 8 + b"{not json" + path.read_bytes()[17:])
    elif damage == "not_lora":
        save_file({"conv_in.weight": torch.ones(2, 2)}, str(path))
    elif damage == "unknown":
        save_file({"mystery.lora_x.weight": torch.ones(2, 2)}, str(path))
    elif damage == "half_pair":
        save_file({"lora_unet_a.lora_down.weight": torch.ones(2, 2)}, str(path))
    elif damage == "3d":
        save_file({"unet.a.lora.down.weight": torch.ones(2, 3, 1), "unet.a.lora.up.weight": torch.ones(3, 2, 1)}, str(path))
    with pytest.raises(UserError) as e:
        formats.load_lora(path)
    msg = str(e.value)
    assert str(path) in msg and expected in msg and "\n" not in msg


def test_pickle_is_refused_unless_opted_in(tmp_path):
    path = tmp_path / "lora.bin"
    torch.save({"unet.a.lora.down.weight": torch.ones(2, 3), "unet.a.lora.up.weight": torch.ones(3, 2)}, path)
    with pytest.raises(UserError, match="refusing to load a pickle"):
        formats.load_lora(path)
    with pytest.raises(UserError, match="refusing"):
        formats.load_lora(tmp_path)  # a folder holding only the pickle
    assert formats.load_lora(path, allow_pickle=True).modules["unet.a"].rank == 2
    torch.save({1: torch.ones(2, 3)}, path)  # a dict, but not keyed by names
    with pytest.raises(UserError, match="expected a flat dict of named dense tensors"):
        formats.load_lora(path, allow_pickle=True)


def test_peft_config_alphas_and_patterns_are_honoured(tmp_path):
    cfg = {"r": 4, "lora_alpha": 8, "rank_pattern": {}, "alpha_pattern": {"mid_block.attentions.0.proj_in": 2}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    t = {}
    for p in ("down_blocks.0.attentions.0.proj_in", "mid_block.attentions.0.proj_in"):
        t[f"base_model.model.{p}.lora_A.weight"] = torch.ones(4, 3)
        t[f"base_model.model.{p}.lora_B.weight"] = torch.ones(3, 4)
    save_file(t, str(tmp_path / "adapter_model.safetensors"))
    lora = formats.load_lora(tmp_path)
    assert lora.format == "peft"
    assert lora.modules["unet.down_blocks.0.attentions.0.proj_in"].alpha == 8
    assert lora.modules["unet.mid_block.attentions.0.proj_in"].alpha == 2


# ---------------------------------------------------------------- malformed files (issue #11)

D, U = "unet.a.lora.down.weight", "unet.a.lora.up.weight"
K = "lora_unet_a"
P = "base_model.model.a.lora_"


def _diffusers(down=(2, 3), up=(3, 2), dtype=torch.float32, fill=0.1):
    return {D: torch.full(down, fill).to(dtype), U: torch.full(up, fill).to(dtype)}


def _kohya(alpha):
    return {f"{K}.lora_down.weight": torch.ones(2, 3), f"{K}.lora_up.weight": torch.ones(3, 2), f"{K}.alpha": alpha}


_PEFT = {P + "A.weight": torch.ones(2, 3), P + "B.weight": torch.ones(3, 2)}

# name: (tensors, header metadata, adapter_config.json text or None, expected words in the one-line error)
MALFORMED = {
    "no_tensors": ({}, {}, None, "holds no tensors"),
    "0d_down": ({D: torch.tensor(1.0), U: torch.ones(3, 2)}, {}, None, "mismatched down/up"),
    "1d_up": ({D: torch.ones(2, 3), U: torch.ones(3)}, {}, None, "mismatched down/up"),
    "conv_up_not_1x1": (_diffusers((2, 3, 3, 3), (4, 2, 3, 3)), {}, None, "mismatched down/up"),
    "rank_0": (_diffusers((0, 3), (3, 0)), {}, None, "mismatched down/up"),
    "int_weights": (_diffusers(dtype=torch.int32), {}, None, "int32 weights"),
    "bool_weights": (_diffusers(dtype=torch.bool), {}, None, "bool weights"),
    "nan": (_diffusers(fill=float("nan")), {}, None, "NaN/Inf weights; the file is damaged"),
    "inf": ({D: torch.ones(2, 3), U: torch.full((3, 2), -float("inf"))}, {}, None, "NaN/Inf weights"),
    "overflowing": (_diffusers(fill=1e30), {}, None, "overflows float32"),
    "two_spellings": ({**_diffusers(), "unet.a.lora_A.weight": torch.ones(2, 3)}, {}, None, "two down weights"),
    "metadata_not_json": (_diffusers(), {"lora_adapter_metadata": "{"}, None, "lora_adapter_metadata header is not valid JSON"),
    "metadata_not_object": (_diffusers(), {"lora_adapter_metadata": "[1]"}, None, "is not a JSON object"),
    "alpha_string": (_diffusers(), {"lora_adapter_metadata": '{"unet.lora_alpha": "8"}'}, None, "expected a positive number"),
    "alpha_nan": (_diffusers(), {"lora_adapter_metadata": '{"unet.lora_alpha": NaN}'}, None, "expected a positive number"),
    "r_bool": (_diffusers(), {"lora_adapter_metadata": '{"unet.r": true}'}, None, "expected a positive number"),
    "pattern_regex": (_diffusers(), {"lora_adapter_metadata": '{"unet.lora_alpha": 4, "unet.alpha_pattern": {"(": 2}}'},
                      None, "invalid pattern"),
    "pattern_value": (_diffusers(), {"lora_adapter_metadata": '{"unet.lora_alpha": 4, "unet.alpha_pattern": {"a": "x"}}'},
                      None, "expected a positive number"),
    "deep_json": (_diffusers(), {"lora_adapter_metadata": "[" * 100000}, None, "not valid JSON (RecursionError)"),
    "zero_modules_not_json": (_diffusers(), {"sdlora_zero_modules": "{"}, None, "sdlora_zero_modules header is not valid JSON"),
    "zero_modules_not_names": (_diffusers(), {"sdlora_zero_modules": '[["unet.a"]]'}, None, "not a list of layer names"),
    "adapter_config_header": (_PEFT, {"adapter_config": "{"}, None, "adapter_config header is not valid JSON"),
    "adapter_config_json": (_PEFT, {}, "{", "adapter_config.json is not valid JSON"),
    "adapter_config_list": (_PEFT, {}, "[]", "adapter_config.json is not a JSON object"),
    "adapter_config_alpha": (_PEFT, {}, '{"lora_alpha": [8]}', "lora_alpha in its adapter_config.json"),
    "kohya_alpha_vector": (_kohya(torch.ones(2)), {}, None, "expected one number"),
    "kohya_alpha_bool": (_kohya(torch.tensor(True)), {}, None, "expected one number"),
    "kohya_alpha_zero": (_kohya(torch.tensor(0.0)), {}, None, "expected a positive number"),
    "kohya_alpha_negative": (_kohya(torch.tensor(-4.0)), {}, None, "expected a positive number"),
    "kohya_alpha_nan": (_kohya(torch.tensor(float("nan"))), {}, None, "expected a positive number"),
    "kohya_alpha_only": ({f"{K}.alpha": torch.tensor(4.0)}, {}, None, "no LoRA layer has both down and up"),
    "peft_key_without_path": ({".lora_A.weight": torch.ones(2, 3)}, {}, None, "unsupported peft LoRA key"),
    "peft_key_newline": ({"a.lora_A.weight\n": torch.ones(2, 3)}, {}, None, "unsupported peft LoRA key"),
    "kohya_key_newline": ({f"{K}\nx.lora_mid.weight": torch.ones(2, 3)}, {}, None, "unsupported kohya key"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_lora_is_one_line_error_naming_the_file(tmp_path, case, capsys):
    """Each of these used to traceback (IndexError, AttributeError, KeyError, re.error, JSONDecodeError, ...)
    or load silently with a wrong scale or NaN weights; now load_lora and the CLI refuse them in one line."""
    from sdlora.cli import main

    tensors, metadata, config, expected = MALFORMED[case]
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path), metadata or None)  # safetensors 0.8 writes a broken header for ({}, {})
    if config is not None:
        (tmp_path / "adapter_config.json").write_text(config)
    with pytest.raises(UserError) as e:
        formats.load_lora(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg, msg
    assert main(["inspect", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {msg}\n"


def test_odd_but_harmless_headers_and_keys_load(tmp_path):
    """An old-style processor key with an unknown projection (a KeyError before) is kept as a layer name for
    the base check to judge; a multi-line base-model name is cut to its first line so later errors stay one line."""
    path = tmp_path / "lora.safetensors"
    key = "unet.a.processor.to_x_lora"
    save_file({f"{key}.down.weight": torch.ones(2, 3), f"{key}.up.weight": torch.ones(3, 2)}, str(path),
              {"ss_sd_model_name": "some/base\nsecond line"})
    lora = formats.load_lora(path)
    assert list(lora.modules) == [key] and lora.base_model == "some/base"


def _pickled_base(tiny_model, tmp_path):
    """A copy of the tiny pipeline whose UNet exists only as pickle (.bin), slightly changed (for extract)."""
    import shutil

    from diffusers import UNet2DConditionModel

    base = tmp_path / "pickled"
    shutil.copytree(tiny_model, base)
    unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
    unet.conv_in.weight.data += 0.01
    for f in (base / "unet").glob("*.safetensors"):
        f.unlink()
    unet.save_pretrained(str(base / "unet"), safe_serialization=False)
    assert [f.suffix for f in (base / "unet").glob("diffusion_pytorch_model*")] == [".bin"]
    return base


def test_pickle_base_weights_need_allow_pickle_everywhere(tiny_model, tmp_path, capsys):
    """generate/fuse/extract used to load .bin base weights silently while training refused them."""
    from sdlora.cli import main
    from sdlora.pipeline import load_base, load_pipeline

    base = _pickled_base(tiny_model, tmp_path)
    for load in (lambda **kw: load_base(base, **kw), lambda **kw: load_pipeline([], base=base, device="cpu", **kw)):
        with pytest.raises(UserError) as e:
            load()
        msg = str(e.value)
        assert msg.startswith(str(base)) and "--allow-pickle" in msg and "\n" not in msg, msg
        assert load(allow_pickle=True).unet.conv_in.weight.shape[0] == 32

    out = tmp_path / "x.safetensors"
    argv = ["extract", "--base", str(tiny_model), "--tuned", str(base), "--rank", "1", "--unet-only", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {base}: could not load its unet") and "--allow-pickle" in err and "\n" not in err
    assert not out.exists()
    assert main(argv + ["--allow-pickle"]) == 0
    assert list(formats.load_lora(out).modules) == ["unet.conv_in"]


def test_text_encoder_keys_use_the_classic_spelling_under_any_transformers(pipe, tmp_path):
    """Files say `text_encoder.text_model.…` (what every loader and every file in the wild uses) even where the
    installed transformers has no `text_model` level; peft config paths omit it so they match either tree."""
    lora = rich_lora(pipe)
    formats.save_lora(lora, tmp_path / "d.safetensors", "diffusers")
    keys = [k for k in load_file(tmp_path / "d.safetensors") if k.startswith("text_encoder.")]
    assert keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys)
    formats.save_lora(lora, tmp_path / "p", "peft")
    te = load_file(tmp_path / "p" / "text_encoder" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.text_model.encoder.layers.") for k in te)
    cfg = json.loads((tmp_path / "p" / "text_encoder" / "adapter_config.json").read_text())
    assert all(t.startswith("encoder.layers.") for t in cfg["target_modules"])


@pytest.mark.parametrize("fmt, edit, said", [
    ("diffusers", lambda m: m | {"unet.r": 16, "unet.lora_alpha": 16}, "r=16"),  # 4x the strength, silently
    ("diffusers", lambda m: m | {"unet.rank_pattern": {k: 8 if "ff.net" in k else v  # the rank-2 layer
                                                       for k, v in m["unet.rank_pattern"].items()}}, "r=8"),
    ("peft", lambda c: c | {"r": 16}, "r=16"),
], ids=["diffusers-r", "diffusers-rank_pattern", "peft-r"])
def test_a_config_rank_that_contradicts_the_weights_is_refused(pipe, tmp_path, capsys, fmt, edit, said):
    """peft (and so diffusers' loader) builds each layer at its config's r and then cannot load other-rank weights;
    sdlora would otherwise apply alpha / (the weights' rank) instead of alpha / r. One line naming the file."""
    lora = rich_lora(pipe)
    file = formats.save_lora(lora, tmp_path / fmt, fmt)
    assert_same_deltas(lora, formats.load_lora(file))  # as written (rank_pattern for ranks 2 and 3): loads
    if fmt == "diffusers":
        tensors, meta = load_file(file), formats.read_tensors(file, False)[1]
        meta["lora_adapter_metadata"] = json.dumps(edit(json.loads(meta["lora_adapter_metadata"])))
        save_file(tensors, file, meta)
    else:
        cfg = file.parent / "adapter_config.json"
        cfg.write_text(json.dumps(edit(json.loads(cfg.read_text()))))
    from sdlora.cli import main

    assert main(["inspect", str(file.parent)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {file}: its ") and said in err and "weights have rank" in err


def test_a_peft_config_with_use_rslora_is_read_at_peft_scale(pipe, tmp_path):
    """A foreign peft folder trained with use_rslora: peft scales by alpha/sqrt(r), not alpha/r; sdlora's loader (and
    so inspect, convert and generate) must apply the strength peft does."""
    from peft import LoraConfig, get_peft_model

    lora = rich_lora(pipe)
    file = formats.save_lora(lora, tmp_path / "peft", "peft")
    for cfg in file.parent.rglob("adapter_config.json"):  # the UNet's, and the text encoder's subfolder
        cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"use_rslora": True}))
    read = formats.load_lora(file)
    for name, m in lora.modules.items():
        tiny = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                              LoraConfig(r=m.rank, lora_alpha=m.alpha, use_rslora=True, target_modules=["0"]))
        peft_scale = tiny.base_model.model[0].scaling["default"]
        got = read.modules[name]
        assert got.alpha / got.rank == pytest.approx(peft_scale), name


def test_kohya_file_is_named_after_the_folder_and_never_a_generic_name(tmp_path):
    """ComfyUI and A1111 keep every LoRA in one folder and show the file's name: a run in `demo/lora` must not write
    `lora.safetensors` (nor `<lora:lora:1>` in its PNGs) that the next run in some other `lora` folder collides with."""
    from sdlora.output.weights import kohya_name

    assert kohya_name(tmp_path / "pokemon-style") == "pokemon-style.safetensors"
    assert kohya_name(tmp_path / "demo" / "lora") == "demo-lora.safetensors"
    assert kohya_name(tmp_path / "pokemon" / "outputs" / "lora") == "pokemon-outputs-lora.safetensors"
    assert kohya_name(tmp_path / "pytorch_lora_weights") == "pytorch_lora_weights_kohya.safetensors"
