"""LoRA injection on SD1.5's real architecture: which layers, how many parameters, file size."""
import torch

from sdlora.io import save_safetensors
from sdlora.lora import inject as lora
from sdlora.output.weights import header as safetensors_metadata
from sdlora.tiny import ARCHS


def _sd15_unet_with_lora(rank=4):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # SD1.5's 860M-parameter UNet without allocating it
        unet = UNet2DConditionModel(**ARCHS["sd15"]["unet"])
    params = lora.add_lora(unet, lora.lora_config(rank, None, lora.UNET_TARGETS))
    # materialise just the LoRA weights
    for name, p in list(unet.named_parameters()):
        if "lora_" in name:
            mod = unet.get_submodule(name.rsplit(".", 1)[0])
            setattr(mod, name.rsplit(".", 1)[1], torch.nn.Parameter(torch.zeros(p.shape)))
    return unet, params


def test_sd15_rank4_has_797184_params_and_3_2_mb(tmp_path):
    unet, params = _sd15_unet_with_lora()
    assert sum(p.numel() for p in params) == 797_184
    assert all(not p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)  # base frozen
    sd = lora.lora_state_dict(unet, "unet")
    assert lora.count_params(sd) == 797_184
    targets = {k.split(".lora.")[0].rsplit(".", 1)[-1] for k in sd}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert len(sd) == 2 * 128  # 16 transformer blocks x 2 attentions x 4 projections, down+up each
    info = dict(base_model="x", rank=4, alpha=4, steps=1, resolution=512, learning_rate=1e-4, target_modules=lora.UNET_TARGETS)
    path = tmp_path / "w.safetensors"
    save_safetensors(sd, path, {"format": "pt", **safetensors_metadata(info)})
    assert abs(path.stat().st_size - 3.2e6) / 3.2e6 < 0.05, path.stat().st_size


def test_custom_targets_and_alpha():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHS["tiny"]["unet"])
    cfg = lora.lora_config(8, 16, ["to_k", "to_v"])
    lora.add_lora(unet, cfg)
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    assert layer.scaling["default"] == 2.0 and layer.lora_A["default"].weight.shape[0] == 8
    assert not hasattr(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q, "lora_A")
