"""Half-precision loading without an fp32 copy: the same weights diffusers' from_pretrained gives, and its
fallbacks."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora import models, streamload
from sdlora.errors import UserError

torch.set_num_threads(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unet_and_vae_equal_diffusers_cast_bit_for_bit(sdxl_model, dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        ours = streamload.load(cls, str(sdxl_model), sub, dtype)
        theirs = cls.from_pretrained(str(sdxl_model), subfolder=sub, torch_dtype=dtype)
        assert ours is not None and not ours.training and ours.config == theirs.config
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]) for k in a)


def test_read_cast_keeps_integers_and_reads_every_dtype(tmp_path):
    t = {"w": torch.randn(3, 4), "h": torch.randn(2).half(), "i": torch.arange(5), "e": torch.zeros(0, 3)}
    save_file(t, tmp_path / "x.safetensors")
    got = streamload.read_cast(tmp_path / "x.safetensors", torch.bfloat16)
    assert got["i"].dtype == torch.int64 and torch.equal(got["i"], t["i"])
    assert torch.equal(got["w"], t["w"].bfloat16()) and torch.equal(got["h"], t["h"].bfloat16())
    assert got["e"].shape == (0, 3)


def test_other_layouts_fall_back_to_diffusers(sdxl_model, tmp_path):
    from diffusers import UNet2DConditionModel

    base = tmp_path / "base"
    shutil.copytree(sdxl_model / "unet", base / "unet")
    f = base / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd["renamed.weight"] = sd.pop(next(iter(sd)))  # a key layout this model does not have
    save_file(sd, f)
    assert streamload.load(UNet2DConditionModel, str(base), "unet", torch.bfloat16) is None
    assert streamload.load(UNet2DConditionModel, str(tmp_path / "nowhere"), "unet", torch.bfloat16) is None


def test_a_truncated_weights_file_is_one_line(sdxl_model, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(sdxl_model / "unet", base / "unet")
    f = base / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match=r"base/unet: could not load \(.*truncated"):
        models.load_unet(str(base), dtype=torch.bfloat16)


def test_sharded_weights_load_too(sdxl_model, tmp_path):
    """A UNet saved in shards (as an fp32 SDXL UNet over 10 GB is) streams shard by shard."""
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(str(sdxl_model), subfolder="unet").save_pretrained(
        tmp_path / "base" / "unet", max_shard_size="2MB")
    assert len(list((tmp_path / "base" / "unet").glob("*.safetensors"))) > 1
    ours = streamload.load(UNet2DConditionModel, str(tmp_path / "base"), "unet", torch.bfloat16)
    theirs = UNet2DConditionModel.from_pretrained(str(sdxl_model), subfolder="unet", torch_dtype=torch.bfloat16)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_empty_weights_file_is_one_line_and_fp8_falls_back(sdxl_model, tmp_path):
    from diffusers import UNet2DConditionModel

    base = tmp_path / "base"
    shutil.copytree(sdxl_model / "unet", base / "unet")
    f = base / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(UserError, match=r"base/unet: could not load \("):
        models.load_unet(str(base), dtype=torch.bfloat16)
    sd = load_file(sdxl_model / "unet" / "diffusion_pytorch_model.safetensors")
    k = next(k for k, v in sd.items() if v.is_floating_point())
    sd[k] = sd[k].to(torch.float8_e4m3fn)  # a dtype the streaming reader does not read: diffusers' path instead
    save_file(sd, f)
    assert streamload.load(UNet2DConditionModel, str(base), "unet", torch.bfloat16) is None
