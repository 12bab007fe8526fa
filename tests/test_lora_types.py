"""LoRA variants beyond plain LoRA: each saved file applies the method's own weight change in every loader."""
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
