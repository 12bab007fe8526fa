"""LoRA variants beyond plain LoRA: each saved file applies the method's own weight change in every loader."""
import json
import math

import pytest
import torch
from helpers import lycoris_modules, read_lora

from sdlora.errors import UserError
from sdlora.lora import formats, inject, tools
from sdlora.output import weights

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]


def _peft_deltas(model) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight change as peft computes it (its own scaling), by diffusers path."""
    return {f"unet.{n}": m.get_delta_weight("default").detach() for n, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


def _info(rank, alpha):
    return {"base_model": "tiny", "rank": rank, "alpha": alpha, "steps": 1, "resolution": 32,
            "learning_rate": 1e-4, "target_modules": TARGETS}


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_rslora_scale_is_alpha_over_sqrt_rank_after_a_round_trip(tiny_model, tmp_path, fmt):
    """rsLoRA scales B @ A by alpha / sqrt(r) (peft's use_rslora); a saved file records alpha * sqrt(r), which every
    loader divides by r: the same change through diffusers' files, kohya's and peft's, and in diffusers itself."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    rank, alpha = 16, 4.0  # rsLoRA scale 1, plain LoRA's would be 0.25
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    config = inject.lora_config(rank, alpha, TARGETS, rslora=True)
    params = inject.add_lora(unet, config)
    torch.manual_seed(0)
    for p in params:  # B starts at zero: give it values, as training would
        p.data.normal_(0, 0.1)
    want = _peft_deltas(unet)
    for m in unet.modules():
        if hasattr(m, "scaling") and "default" in m.scaling:
            assert m.scaling["default"] == pytest.approx(alpha / math.sqrt(rank))  # peft really runs rsLoRA

    path = tmp_path / "pytorch_lora_weights.safetensors"
    sd, meta = weights.save(path, {"unet": (unet, config, None)}, _info(rank, alpha))
    lora = formats.load_lora(formats.save_lora(formats.load_lora(path), tmp_path / fmt, fmt))
    assert [m.alpha for m in lora.modules.values()] == pytest.approx([alpha * math.sqrt(rank)] * len(want))
    assert lora.modules.keys() == want.keys()
    for name, m in lora.modules.items():
        torch.testing.assert_close(m.delta(), want[name].float().reshape(m.delta().shape), rtol=1e-5, atol=1e-7)

    if fmt == "diffusers":  # an unmodified pipeline reads the training run's own file the same way
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
        pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="default")
        got = _peft_deltas(pipe.unet)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_files_hold_the_change_from_the_unmodified_base(tiny_model, tmp_path, init):
    """PiSSA/OLoRA start A and B from the layer's own weight and take that part out of the frozen weight. A file
    for everyone's (unmodified) base must hold W_res + s B A - W0 = s (B A - B0 A0): rank 2r, in every format."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    rank, alpha, targets = 4, 4, ["to_q", "to_k", "to_v", "to_out.0"]
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    w0 = {n: m.weight.detach().clone() for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    config = inject.lora_config(rank, alpha, targets, init=init)
    params = inject.add_lora(unet, config)
    initial = inject.initial_weights(unet)
    torch.manual_seed(0)
    for p in params:  # training moves A and B away from where they started
        p.data += torch.randn_like(p) * 0.05
    trained = {f"unet.{n}": (m.base_layer.weight + m.get_delta_weight("default")).detach()
               for n, m in unet.named_modules() if hasattr(m, "lora_A")}
    assert any((unet.get_submodule(n[5:]).base_layer.weight - w0[n[5:]]).abs().max() > 1e-3 for n in trained)

    path = tmp_path / "pytorch_lora_weights.safetensors"
    weights.save(path, {"unet": (unet, config, initial)}, _info(rank, alpha))
    for fmt in formats.FORMATS:
        lora = formats.load_lora(formats.save_lora(formats.load_lora(path), tmp_path / fmt, fmt))
        assert lora.modules.keys() == trained.keys() and {m.rank for m in lora.modules.values()} == {2 * rank}
        for name, m in lora.modules.items():
            torch.testing.assert_close(w0[name[5:]] + m.delta(), trained[name], rtol=1e-5, atol=1e-6)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)  # unmodified base, diffusers' own loader
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    pipe.fuse_lora()
    for name, want in trained.items():
        torch.testing.assert_close(pipe.unet.get_submodule(name[5:]).base_layer.weight, want, rtol=1e-5, atol=1e-6)


def _dora(weight, up, down, scale, magnitude):
    """DoRA's weight (Liu et al. 2024, as peft computes it): m * V / |V| per output channel, V = W + s B A."""
    v = weight.float() + scale * (up.float().flatten(1) @ down.float().flatten(1)).reshape(weight.shape)
    return magnitude.float().reshape(-1, *[1] * (v.dim() - 1)) * v / v.flatten(1).norm(dim=1).reshape(
        -1, *[1] * (v.dim() - 1))


def _lycoris_merged_weights_are(file, pipe, want, monkeypatch):
    """LyCORIS's kohya-network loader merges `file` into exactly the `want` weights."""
    loaded = lycoris_modules(file, pipe, monkeypatch)
    assert len(loaded) == len(want)
    for name, w in want.items():
        comp, path = name.split(".", 1)
        key = ("lora_unet_" if comp == "unet" else "lora_te_") + path.replace(".", "_")
        torch.testing.assert_close(loaded[key].get_merged_weight()[0].float(), w, rtol=1e-5, atol=1e-6, msg=key)


def test_dora_weights_follow_the_formula_in_every_format_and_loader(tiny_model, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from sdlora import load_pipeline
    from sdlora.pipeline import fuse_loras

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    parts, want = {}, {}
    for comp, targets in (("unet", ["to_q", "to_v", "conv1"]), ("text_encoder", ["q_proj", "out_proj"])):
        model = getattr(pipe, comp)
        config = inject.lora_config(4, 8, targets, dora=True)
        params = inject.add_lora(model, config)
        torch.manual_seed(1)
        for p in params:  # B starts at zero and m at |W|: move both, as training would
            p.data += torch.randn_like(p) * 0.1
        for n, m in model.named_modules():
            if hasattr(m, "lora_A") and "default" in m.lora_A:
                w = m.base_layer.weight.detach()
                want[formats.canonical(comp, n)] = _dora(w, m.lora_B["default"].weight, m.lora_A["default"].weight,
                                                         m.scaling["default"], m.lora_magnitude_vector["default"].weight)
                if isinstance(m.base_layer, torch.nn.Linear):  # the formula is what peft's forward computes
                    x = torch.randn(3, w.shape[1])
                    bias = 0 if m.base_layer.bias is None else m.base_layer.bias
                    torch.testing.assert_close(m(x), x @ want[formats.canonical(comp, n)].T + bias, rtol=1e-4, atol=1e-5)
        parts[comp] = (model, config, None)
    assert any("conv1" in n for n in want) and any(n.startswith("text_encoder.") for n in want)
    path = tmp_path / "train" / "pytorch_lora_weights.safetensors"
    path.parent.mkdir()
    weights.save(path, parts, _info(4, 8))
    weights.save_kohya(tmp_path / "train" / "train.safetensors", *read_lora(path))

    def base_weight(name):
        comp, p = name.split(".", 1)
        return pipe_base.components[comp].get_submodule(formats.live_path(comp, p)).weight

    pipe_base = StableDiffusionPipeline.from_pretrained(tiny_model)
    for fmt in formats.FORMATS:
        lora = formats.load_lora(formats.save_lora(formats.load_lora(path), tmp_path / fmt, fmt))
        assert lora.modules.keys() == want.keys()
        for name, m in lora.modules.items():
            w = base_weight(name)
            torch.testing.assert_close(w + m.delta(w), want[name], rtol=1e-5, atol=1e-6)
    kohya = formats.load_lora(tmp_path / "train" / "train.safetensors")  # the file a run writes for ComfyUI & co.
    assert {tuple(m.magnitude.shape) for m in kohya.modules.values()} == {(m.up.shape[0],) for m in kohya.modules.values()}
    raw, _ = read_lora(tmp_path / "train" / "train.safetensors")  # LyCORIS's output-axis dora_scale: [out, 1(, 1, 1)]
    assert {tuple(v.shape[1:]) for k, v in raw.items() if k.endswith(".dora_scale")} == {(1,), (1, 1, 1)}
    with pytest.raises(UserError, match="DoRA"):
        tools.resize(kohya, 2)
    _lycoris_merged_weights_are(tmp_path / "train" / "train.safetensors", pipe_base, want, monkeypatch)

    def fused(p):
        out = {}
        for name in want:
            comp, path_ = name.split(".", 1)
            layer = p.components[comp].get_submodule(formats.live_path(comp, path_))
            out[name] = getattr(layer, "base_layer", layer).weight.detach()
        return out

    plain = StableDiffusionPipeline.from_pretrained(tiny_model)  # diffusers' own loader, the training file
    plain.load_lora_weights(str(path.parent))
    plain.fuse_lora(components=["unet", "text_encoder"])
    ours = load_pipeline([str(tmp_path / "kohya" / "lora.safetensors")], base=str(tiny_model), dtype="fp32")
    fuse_loras(ours, unload=True)
    for who, got in (("diffusers", fused(plain)), ("sdlora", fused(ours))):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{who} {name}: {m}")


@pytest.mark.parametrize("scale,expect", [
    (torch.ones(1, 8), "input-axis dora_scale [1, 8]"),
    (torch.ones(3, 1), "DoRA magnitude of shape [3, 1]; expected 8 values"),
    (torch.ones(8, 1, dtype=torch.int64), "int64 DoRA magnitude"),
    (torch.full((8, 1), float("nan")), "NaN/Inf"),
    (None, "only a DoRA magnitude"),
])
def test_bad_dora_scale_is_one_clear_line(scale, expect):
    tensors = {"lora_unet_x_to_q.lora_down.weight": torch.randn(2, 8), "lora_unet_x_to_q.lora_up.weight": torch.randn(8, 2),
               "lora_unet_x_to_q.alpha": torch.tensor(2.0), "lora_unet_x_to_q.dora_scale": scale}
    if scale is None:
        tensors = {"lora_unet_x_to_q.dora_scale": torch.ones(8, 1)}
    with pytest.raises(UserError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        formats.parse(tensors, source="f.safetensors")


def _product_formula(kind: str, layer, shape) -> torch.Tensor:
    """LoHa's (w1_a w1_b) ⊙ (w2_a w2_b) · alpha/r, LoKr's kron(w1, w2) · alpha/r, computed from a peft layer's own
    parameters (peft scales LoKr by alpha/r even with both factors full)."""
    p = {k: getattr(layer, k)["default"].detach() for k in dir(layer)
         if k.startswith(("hada_", "lokr_")) and isinstance(getattr(layer, k), torch.nn.ParameterDict)
         and "default" in getattr(layer, k)}
    if kind == "loha":
        d = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    else:
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        d = torch.kron(w1, w2.flatten(1))
    return (d * layer.alpha["default"] / layer.r["default"]).reshape(shape)


def _lycoris_forward_matches(file, pipe, want, monkeypatch):
    """LyCORIS's own modules, built from `file` by its kohya-network loader, compute x -> layer with weight W + change
    for every layer (its forward, the path ComfyUI/A1111 mirror; LyCORIS 4.1.3's get_merged_weight scales LoHa twice)."""
    loaded = lycoris_modules(file, pipe, monkeypatch)
    assert len(loaded) == len(want)
    for name, w in want.items():
        comp, path = name.split(".", 1)
        layer = pipe.components[comp].get_submodule(formats.live_path(comp, path))
        key = ("lora_unet_" if comp == "unet" else "lora_te_") + path.replace(".", "_")
        x = torch.randn(2, w.shape[1]) if w.dim() == 2 else torch.randn(1, w.shape[1], 6, 6)
        with torch.no_grad():
            ref = (torch.nn.functional.linear(x, w, layer.bias) if w.dim() == 2 else
                   torch.nn.functional.conv2d(x, w, layer.bias, padding=layer.padding))
            torch.testing.assert_close(loaded[key](x), ref, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_lokr_weights_follow_the_formula_in_every_format_and_loader(tiny_model, tmp_path, monkeypatch, kind):
    """A trained LoHa/LoKr (peft's layers, UNet attention + conv and text encoder): the weights sdlora's, LyCORIS's
    and peft's loaders build from every file format are W + the method's formula; diffusers cannot read them,
    resize says so."""
    from diffusers import StableDiffusionPipeline
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model, set_peft_model_state_dict

    from sdlora import load_pipeline
    from sdlora.pipeline import fuse_loras

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    parts, want = {}, {}
    for comp, targets in (("unet", ["to_q", "to_v", "conv1"]), ("text_encoder", ["q_proj", "out_proj"])):
        model = getattr(pipe, comp)
        config = inject.lora_config(2, 3.0, targets, kind=kind)  # alpha/r = 1.5: the scale must travel
        params = inject.add_lora(model, config)
        torch.manual_seed(2)
        for p in params:  # one factor starts at zero: move all, as training would
            p.data += torch.randn_like(p) * 0.3
        for n, m in model.named_modules():
            if hasattr(m, "scaling") and "default" in m.scaling:
                w = m.base_layer.weight.detach()
                change = _product_formula(kind, m, w.shape)
                torch.testing.assert_close(m.get_delta_weight("default"), change)  # peft really is LoHa/LoKr
                want[formats.canonical(comp, n)] = w + change
        parts[comp] = (model, config, None)
    assert any("conv1" in n for n in want) and any(n.startswith("text_encoder.") for n in want)
    train = tmp_path / "train"
    train.mkdir()
    weights.save(train / "pytorch_lora_weights.safetensors", parts, {**_info(2, 3), "lora_type": kind})
    weights.save_kohya(train / "train.safetensors", *read_lora(train / "pytorch_lora_weights.safetensors"))
    raw, meta = read_lora(train / "train.safetensors")
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == kind
    assert any(k.endswith(".hada_w1_a" if kind == "loha" else ".lokr_w1") for k in raw)

    pipe_base = StableDiffusionPipeline.from_pretrained(tiny_model)
    base = {n: pipe_base.components[n.split(".", 1)[0]].get_submodule(formats.live_path(*n.split(".", 1))).weight
            for n in want}
    for fmt in formats.FORMATS:  # sdlora's reader, every format, through a write and a read
        lora = formats.load_lora(formats.save_lora(formats.load_lora(train / "train.safetensors"), tmp_path / fmt, fmt))
        assert lora.modules.keys() == want.keys() and {m.kind for m in lora.modules.values()} == {kind}
        for name, m in lora.modules.items():
            torch.testing.assert_close(base[name] + m.delta(base[name]), want[name], rtol=1e-5, atol=1e-6)
    _lycoris_forward_matches(train / "train.safetensors", pipe_base, want, monkeypatch)

    unet = StableDiffusionPipeline.from_pretrained(tiny_model).unet  # peft itself, from the peft folder
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    inject_adapter_in_model({"LOHA": LoHaConfig, "LOKR": LoKrConfig}[cfg.pop("peft_type")](**cfg), unet)
    sd, _ = read_lora(tmp_path / "peft" / "adapter_model.safetensors")
    res = set_peft_model_state_dict(unet, {k.removeprefix("base_model.model."): v for k, v in sd.items()})
    assert not res.unexpected_keys
    for n, m in unet.named_modules():
        if hasattr(m, "scaling") and "default" in m.scaling:
            torch.testing.assert_close(m.base_layer.weight + m.get_delta_weight("default"), want[f"unet.{n}"],
                                       rtol=1e-5, atol=1e-6)

    ours = load_pipeline([str(train)], base=str(tiny_model), dtype="fp32")  # sdlora's loader (then fused)
    fuse_loras(ours, unload=True)
    for name in want:
        comp, path = name.split(".", 1)
        layer = ours.components[comp].get_submodule(formats.live_path(comp, path))
        torch.testing.assert_close(getattr(layer, "base_layer", layer).weight, want[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):  # diffusers' own loader has no LoHa/LoKr: it refuses (the card says so)
        StableDiffusionPipeline.from_pretrained(tiny_model).load_lora_weights(str(train))
    with pytest.raises(UserError, match={"loha": "LoHa", "lokr": "LoKr"}[kind]):
        tools.resize(formats.load_lora(train / "train.safetensors"), 1)


def test_lycoris_files_from_outside_apply_their_documented_change(tiny_model, tmp_path, monkeypatch):
    """LoHa/LoKr files as LyCORIS lays them out (its key names and shapes, written here by hand): Tucker factors on a
    conv layer, a LoKr with both factors full (alpha ignored: scale 1), one with both decomposed (alpha / rank). The
    weights sdlora's loader applies are W + the documented change, and match LyCORIS's own modules."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from sdlora import load_pipeline
    from sdlora.pipeline import fuse_loras

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    layers = {"q": f"{attn}.to_q", "k": f"{attn}.to_k", "c1": "down_blocks.0.resnets.0.conv1",
              "c2": "up_blocks.1.resnets.0.conv1"}
    w = {k: pipe.unet.get_submodule(p).weight.detach() for k, p in layers.items()}
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    key = {k: "lora_unet_" + p.replace(".", "_") for k, p in layers.items()}
    out_q, in_q = w["q"].shape
    a, b = 4, out_q // 4  # LyCORIS's factor -1 split of 32: (4, 8)
    t = {}
    # LoKr, both full, alpha 16: loaders ignore alpha (scale 1)
    t |= {f"{key['q']}.lokr_w1": r(a, 4), f"{key['q']}.lokr_w2": r(b, in_q // 4), f"{key['q']}.alpha": torch.tensor(16.0)}
    want = {"q": torch.kron(t[f"{key['q']}.lokr_w1"], t[f"{key['q']}.lokr_w2"])}
    # LoKr, both decomposed (rank 1, as LyCORIS decomposes a 4x4 factor), alpha 0.5: scale 1/2
    f = {"lokr_w1_a": r(a, 1), "lokr_w1_b": r(1, 4), "lokr_w2_a": r(b, 1), "lokr_w2_b": r(1, in_q // 4)}
    t |= {f"{key['k']}.{n}": v for n, v in f.items()} | {f"{key['k']}.alpha": torch.tensor(0.5)}
    want["k"] = torch.kron(f["lokr_w1_a"] @ f["lokr_w1_b"], f["lokr_w2_a"] @ f["lokr_w2_b"]) * 0.5
    # LoHa with Tucker factors on a 3x3 conv (rank 2, alpha 1: scale 1/2)
    o, i, kh, kw = w["c1"].shape
    f = {"hada_t1": r(2, 2, kh, kw), "hada_w1_a": r(2, o), "hada_w1_b": r(2, i),
         "hada_t2": r(2, 2, kh, kw), "hada_w2_a": r(2, o), "hada_w2_b": r(2, i)}
    t |= {f"{key['c1']}.{n}": v for n, v in f.items()} | {f"{key['c1']}.alpha": torch.tensor(1.0)}
    full = [torch.einsum("i j k l, j r, i p -> p r k l", f[f"hada_t{n}"], f[f"hada_w{n}_b"], f[f"hada_w{n}_a"])
            for n in (1, 2)]
    want["c1"] = full[0] * full[1] * 0.5
    # LoKr on a 3x3 conv with a full 4-D w2 (both full: scale 1)
    o, i, kh, kw = w["c2"].shape
    f = {"lokr_w1": r(4, 4), "lokr_w2": r(o // 4, i // 4, kh, kw)}
    t |= {f"{key['c2']}.{n}": v for n, v in f.items()} | {f"{key['c2']}.alpha": torch.tensor(4.0)}
    want["c2"] = torch.kron(f["lokr_w1"][:, :, None, None], f["lokr_w2"])
    save_file(t, str(tmp_path / "outside.safetensors"))

    lora = formats.load_lora(tmp_path / "outside.safetensors")
    merged = {f"unet.{layers[k]}": w[k] + want[k].reshape(w[k].shape) for k in layers}
    for k, p in layers.items():
        torch.testing.assert_close(lora.modules[f"unet.{p}"].delta(w[k]), want[k].reshape(w[k].shape))
    _lycoris_forward_matches(tmp_path / "outside.safetensors", pipe, merged, monkeypatch)
    ours = load_pipeline([str(tmp_path / "outside.safetensors")], base=str(tiny_model), dtype="fp32")
    fuse_loras(ours, unload=True)
    for name, expected in merged.items():
        torch.testing.assert_close(ours.unet.get_submodule(name.split(".", 1)[1]).weight, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tensors,expect", [
    ({"x_to_q.hada_w1_a": torch.ones(8, 2), "x_to_q.hada_w1_b": torch.ones(2, 8), "x_to_q.hada_w2_a": torch.ones(8, 2)},
     "LoHa layer without hada_w2_b"),
    ({"x_to_q.hada_w1_a": torch.ones(8, 2), "x_to_q.hada_w1_b": torch.ones(3, 8), "x_to_q.hada_w2_a": torch.ones(8, 2),
      "x_to_q.hada_w2_b": torch.ones(2, 8)}, "factors whose shapes do not multiply"),
    ({"x_to_q.lokr_w1": torch.ones(2, 2), "x_to_q.lokr_w2": torch.ones(4, 4), "x_to_q.lora_down.weight": torch.ones(1, 8)},
     "mixes LoKr and LoRA weights"),
    ({"x_to_q.lokr_w1": torch.ones(2, 2, dtype=torch.int8), "x_to_q.lokr_w2": torch.ones(4, 4)}, "int8 weights"),
    ({"x_to_q.lokr_w1": torch.ones(2), "x_to_q.lokr_w2": torch.ones(4, 4)}, r"lokr_w1 of shape \[2\]; expected a 2-D"),
    ({"x_to_q.lokr_w1": torch.full((2, 2), 1e30), "x_to_q.lokr_w2": torch.full((4, 4), 1e30)}, "overflows float32"),
])
def test_bad_lycoris_layers_are_one_clear_line(tensors, expect):
    with pytest.raises(UserError, match=expect):
        formats.parse({"lora_unet_" + k: v for k, v in tensors.items()}, source="f.safetensors")


def test_adalora_file_holds_each_layers_final_rank_and_peft_change(tiny_model, tmp_path):
    """AdaLoRA's B (A * E) * alpha / init_r with some singular values pruned: the saved plain LoRA has each layer at
    the rank it kept (pruned-away layers left out) and the same change, in every format and in diffusers."""
    from diffusers import StableDiffusionPipeline

    from sdlora.lora import adalora

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    cfg = adalora.config(2, 3.0, ["to_q", "conv1"], 0.0, init_r=4, total_steps=10, tinit=1, tfinal=2, delta_t=1)
    tuner, params = adalora.attach(pipe.unet, cfg)
    torch.manual_seed(4)
    for p in params:
        p.data.normal_(0, 0.3)
    layers = [(n, m) for n, m in pipe.unet.named_modules() if hasattr(m, "lora_E") and "default" in m.lora_E]
    for i, (_, m) in enumerate(layers):  # what pruning leaves: 4, 3, 2, 1 or 0 of the 4 singular values
        m.lora_E["default"].data[: i % 5] = 0
    want = {}
    for n, m in layers:
        a, e, b = m.lora_A["default"], m.lora_E["default"], m.lora_B["default"]
        change = (b @ (a * e)).reshape(m.base_layer.weight.shape) * 3.0 / (4 + 1e-5)  # peft's formula
        torch.testing.assert_close(m.get_delta_weight("default"), change)
        if e.any():
            want[f"unet.{n}"] = change.detach()
    info = {**_info(2, 3), "lora_type": "adalora"}
    weights.save(tmp_path / "pytorch_lora_weights.safetensors", {"unet": (pipe.unet, cfg, None)}, info)
    lora = formats.load_lora(tmp_path)
    assert lora.modules.keys() == want.keys() and len(want) < len(layers)
    assert {n: m.rank for n, m in lora.modules.items()} == {
        f"unet.{n}": int((m.lora_E["default"] != 0).sum()) for n, m in layers if f"unet.{n}" in want}
    for fmt in formats.FORMATS:
        again = formats.load_lora(formats.save_lora(lora, tmp_path / fmt, fmt))
        for name, m in again.modules.items():
            torch.testing.assert_close(m.delta(), want[name], rtol=1e-5, atol=1e-6)
    plain = StableDiffusionPipeline.from_pretrained(tiny_model)  # diffusers reads the per-layer ranks
    plain.load_lora_weights(str(tmp_path), adapter_name="a")
    for name, change in want.items():
        torch.testing.assert_close(plain.unet.get_submodule(name.split(".", 1)[1]).get_delta_weight("a"), change,
                                   rtol=1e-5, atol=1e-6)


def test_lokr_headers_describe_the_tensors_and_inspect_agrees(tiny_model, tmp_path, capsys):
    """A LoKr layer is written at scale 1 (alpha/r folded into lokr_w1): its kohya alpha tensors hold its rank, and
    both files' ss_network_alpha say so (not the training alpha), as does `sdlora inspect`."""
    from diffusers import UNet2DConditionModel

    from sdlora.cli import main

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    config = inject.lora_config(2, 1.0, ["to_q", "to_v"], kind="lokr")  # w2 low-rank (rank 2), alpha/r = 1/2
    for p in inject.add_lora(unet, config):
        p.data += 0.1
    diffusers_file, kohya_file = tmp_path / "pytorch_lora_weights.safetensors", tmp_path / "k.safetensors"
    weights.save(diffusers_file, {"unet": (unet, config, None)}, {**_info(2, 1), "lora_type": "lokr"})
    weights.save_kohya(kohya_file, *read_lora(diffusers_file))
    raw, meta = read_lora(kohya_file)
    assert {float(t) for k, t in raw.items() if k.endswith(".alpha")} == {2.0}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "2")
    assert (read_lora(diffusers_file)[1]["ss_network_dim"], read_lora(diffusers_file)[1]["ss_network_alpha"]) == ("2", "2")
    assert main(["inspect", str(kohya_file), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ranks"] == [2] and d["alphas"] == [2.0] and d["metadata"]["ss_network_alpha"] == "2"
