"""LoRA variants beyond plain LoRA: each saved file applies the method's own weight change in every loader."""
import math

import pytest
import torch

from sdlora.lora import formats, inject
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
