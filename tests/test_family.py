"""Base model families: the tiny SD 2.x / SDXL builders, detection, what a run records,
v-prediction trained on the velocity without a flag, and SDXL's real LoRA size (meta device)."""
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_images
from helpers import ROOT, T2I, env, fast_flags, read_lora

from sdlora import models
from sdlora.output.weights import header
from sdlora.tiny import ARCHS

torch.set_num_threads(1)


# ---------------------------------------------------------------- the tiny builders

def test_sd2_tiny_has_sd2s_layout_and_a_v_prediction_scheduler(sd2_model):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd2_model, safety_checker=None)
    unet = pipe.unet.config
    assert unet.use_linear_projection and tuple(unet.attention_head_dim) == (2, 4)
    assert pipe.text_encoder.config.hidden_act == "gelu"
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size
    sched = pipe.scheduler
    assert isinstance(sched, DDPMScheduler)
    assert (sched.config.prediction_type, sched.config.beta_schedule, sched.config.beta_start,
            sched.config.beta_end) == ("v_prediction", "scaled_linear", 0.00085, 0.012)


def test_sdxl_tiny_loads_as_an_sdxl_pipeline_and_draws_64px(sdxl_model):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_model)
    assert json.loads((sdxl_model / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert pipe.tokenizer is not None and pipe.tokenizer_2 is not None
    u, te1, te2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert u.addition_embed_type == "text_time" and tuple(u.transformer_layers_per_block) == (1, 2)
    # prompt embeddings: both encoders' hidden states side by side; added conditioning: 6 time ids + pooled text
    assert u.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert u.projection_class_embeddings_input_dim == 6 * u.addition_time_embed_dim + te2.projection_dim
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_sdxl_real_architecture_on_the_meta_device():
    from sdlora.tiny import build

    with torch.device("meta"):
        parts = build("sdxl")
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    assert n["unet"] == 2_567_463_684  # SDXL base 1.0's UNet
    u = parts["unet"].config
    assert u.cross_attention_dim == parts["text_encoder"].config.hidden_size + parts["text_encoder_2"].config.hidden_size
    assert u.projection_class_embeddings_input_dim == \
        6 * u.addition_time_embed_dim + parts["text_encoder_2"].config.projection_dim


def test_make_tiny_cli_arch_choices(tmp_path, capsys):
    from sdlora.cli import main

    assert main(["make-tiny", str(tmp_path / "xl"), "--arch", "sdxl-tiny"]) == 0
    assert "StableDiffusionXLPipeline" in capsys.readouterr().out
    assert models.family(str(tmp_path / "xl")) == "sdxl"
    with pytest.raises(SystemExit):
        main(["make-tiny", str(tmp_path / "x"), "--arch", "sd4"])
    assert "sd2-tiny" in capsys.readouterr().err


# ---------------------------------------------------------------- detection

def test_family_of_the_tiny_models(tiny_model, sd2_model, sdxl_model):
    assert models.family(str(tiny_model)) == "sd1"
    assert models.family(models.resolve_base("sdlora-tiny")) == "sd1"
    assert models.family(str(sd2_model)) == "sd2"
    assert models.family(str(sdxl_model)) == "sdxl"


@pytest.mark.parametrize("unet,pipeline_class,family", [
    (ARCHS["sd15"]["unet"], "StableDiffusionPipeline", "sd1"),
    (dict(ARCHS["sd15"]["unet"], cross_attention_dim=1024, use_linear_projection=True), None, "sd2"),
    (dict(cross_attention_dim=1024), None, "sd2"),  # SD 2.0 checkpoints without use_linear_projection
    (ARCHS["sdxl"]["unet"], "StableDiffusionXLPipeline", "sdxl"),
    (ARCHS["sdxl"]["unet"], None, "sdxl"),  # a UNet folder alone: text_time conditioning says it
    ({}, "StableDiffusionXLImg2ImgPipeline", "sdxl"),
    (dict(cross_attention_dim=2048), None, "sd1"),  # no text_time: not an SDXL UNet diffusers could run
    ({}, None, "sd1"),  # nothing readable: the common case, loading reports real problems
    (ARCHS["tiny"]["unet"], None, "sd1"),
    (ARCHS["sd2-tiny"]["unet"], None, "sd2"),
])
def test_family_of_configs(unet, pipeline_class, family):
    assert models.family_of(unet, pipeline_class) == family


def test_architecture_follows_the_family():
    assert models.architecture(ARCHS["sd15"]["unet"]) == "stable-diffusion-v1"
    assert models.architecture(ARCHS["sd15"]["unet"], "v_prediction") == "stable-diffusion-v1"
    assert models.architecture(ARCHS["sd2-tiny"]["unet"], "v_prediction") == "stable-diffusion-v2-768-v"
    assert models.architecture(ARCHS["sd2-tiny"]["unet"], "epsilon") == "stable-diffusion-v2-512"
    assert models.architecture(ARCHS["sdxl"]["unet"]) == "stable-diffusion-xl-v1-base"
    assert models.architecture({}, "epsilon", "sd2") == "stable-diffusion-v2-512"
    assert models.describe("sd2", "v_prediction") == "SD 2.x (v-prediction)"
    assert models.describe("sd1", "epsilon") == "SD 1.x" and models.describe("sdxl") == "SDXL"


# ---------------------------------------------------------------- what the files record

@pytest.mark.parametrize("arch,prediction,version,v2", [
    ("stable-diffusion-v1", "epsilon", "sd_v1", "False"),
    ("stable-diffusion-v2-512", "epsilon", "sd_v2", "True"),
    ("stable-diffusion-v2-768-v", "v_prediction", "sd_v2_v", "True"),
    ("stable-diffusion-xl-v1-base", "epsilon", "sdxl_base_v1-0", "False"),
])
def test_header_uses_kohyas_family_names(arch, prediction, version, v2):
    info = dict(base_model="x", rank=4, alpha=4, steps=1, resolution=512, learning_rate=1e-4,
                target_modules=["to_q"], architecture=arch, prediction_type=prediction)
    h = header(info)
    assert (h["ss_base_model_version"], h["ss_v2"], h["modelspec.architecture"]) == (version, v2, f"{arch}/lora")
    assert h["modelspec.prediction_type"] == {"v_prediction": "v"}.get(prediction, prediction)


# ---------------------------------------------------------------- SD 2.x v-prediction

def test_target_is_the_velocity_for_a_v_prediction_scheduler():
    from diffusers import DDPMScheduler

    from sdlora.training import losses
    from sdlora.tiny import SCHEDULE

    sched = DDPMScheduler(**SCHEDULE, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    v = losses.target(sched, lat, noise, t)
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a * noise - s * lat)  # v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0
    sched.register_to_config(prediction_type="epsilon")
    assert losses.target(sched, lat, noise, t) is noise


SPY = """
import json, runpy, sys, torch
import sdlora.training.losses as losses
real, seen = losses.target, []
def spy(sched, latents, noise, t):
    out = real(sched, latents, noise, t)
    seen.append({"prediction_type": sched.config.prediction_type, "noise": bool(torch.equal(out, noise)),
                 "velocity": bool(torch.allclose(out, sched.get_velocity(latents, noise, t))),
                 "terminal_alpha": float(sched.alphas_cumprod[-1])})
    return out
losses.target = spy
script, record = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    open(record, "w").write(json.dumps(seen))
"""


def _spied_run(tmp_path, argv):
    """train_text_to_image_lora.py as a user runs it, with losses.target recorded at every loss."""
    record = tmp_path / "targets.json"
    r = subprocess.run([sys.executable, "-c", SPY, str(T2I), str(record), *argv], capture_output=True, text=True,
                       env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r, json.loads(record.read_text())


def _generate(pipe):
    return pipe("a red square on a blue background", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                height=32, width=32, output_type="np").images


def test_sd2_v_prediction_trains_on_the_velocity_and_loads_in_diffusers(sd2_model, tmp_path, caplog):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    data = make_images(tmp_path / "d", n=4)
    out = tmp_path / "o"
    r, seen = _spied_run(tmp_path, fast_flags(sd2_model, out, train_data_dir=data, max_train_steps=4))
    assert len(seen) == 4 and all({**s, "terminal_alpha": None} == {"prediction_type": "v_prediction", "noise": False,
                                                                    "velocity": True, "terminal_alpha": None}
                                  for s in seen), seen
    assert all(s["terminal_alpha"] > 1e-3 for s in seen)  # SD 2.x's own schedule keeps some signal at t = 999
    assert r.stderr.count("base model: SD 2.x (v-prediction)") == 1
    _, meta = read_lora(out / "pytorch_lora_weights.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v2_v", "True")
    _, kohya_meta = read_lora(out / "o.safetensors")
    assert kohya_meta["ss_base_model_version"] == "sd_v2_v"
    assert "| base model family | SD 2.x (v-prediction) |" in (out / "README.md").read_text()

    pipe = StableDiffusionPipeline.from_pretrained(sd2_model, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    before = _generate(pipe)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(out))
    assert not [x for x in caplog.records if "unexpected key" in x.getMessage().lower()
                or "missing key" in x.getMessage().lower()], caplog.text
    assert np.abs(_generate(pipe) - before).max() > 1e-4, "the SD2 LoRA did not change the images"
    pipe.unload_lora_weights()
    assert np.array_equal(_generate(pipe), before)


def test_zero_terminal_snr_rescales_the_schedule_the_loss_uses(sd2_model, tiny_model, tmp_path):
    data = make_images(tmp_path / "d", n=2)
    out = tmp_path / "o"
    r, seen = _spied_run(tmp_path, fast_flags(sd2_model, out, train_data_dir=data, max_train_steps=2,
                                              zero_terminal_snr=True))
    # diffusers' rescale_betas_zero_snr: no signal left at the last timestep (ᾱ = 0 for DDPM)
    assert seen and all(s["velocity"] and s["terminal_alpha"] < 1e-6 for s in seen), seen
    assert "--zero_terminal_snr with" not in r.stderr
    _, meta = read_lora(out / "pytorch_lora_weights.safetensors")
    assert meta["ss_zero_terminal_snr"] == "True"
    assert "| zero terminal SNR | True |" in (out / "README.md").read_text()
    r = subprocess.run([sys.executable, str(T2I), *fast_flags(tiny_model, tmp_path / "eps", train_data_dir=data,
                                                               max_train_steps=1, zero_terminal_snr=True)],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0 and "--zero_terminal_snr with epsilon prediction" in r.stderr


def test_prediction_type_flag_overrides_the_scheduler(sd2_model, tmp_path):
    data = make_images(tmp_path / "d", n=2)
    out = tmp_path / "o"
    r, seen = _spied_run(tmp_path, fast_flags(sd2_model, out, train_data_dir=data, max_train_steps=1,
                                              prediction_type="epsilon"))
    assert seen and all(s["prediction_type"] == "epsilon" and s["noise"] for s in seen), seen
    assert "base model: SD 2.x; --prediction_type epsilon overrides its scheduler's v_prediction" in r.stderr
    _, meta = read_lora(out / "pytorch_lora_weights.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert (meta["ss_base_model_version"], meta["modelspec.prediction_type"]) == ("sd_v2", "epsilon")


# ---------------------------------------------------------------- SDXL's LoRA size (issue #15's must-show)

def test_sdxl_rank4_attention_lora_has_5806080_params_23_2_mb(tmp_path):
    from diffusers import UNet2DConditionModel

    from sdlora.io import save_safetensors
    from sdlora.lora import inject

    with torch.device("meta"):  # SDXL's 2.6 G-parameter UNet without allocating it
        unet = UNet2DConditionModel(**ARCHS["sdxl"]["unet"])
    params = inject.add_lora(unet, inject.lora_config(4, None, inject.UNET_TARGETS))
    assert sum(p.numel() for p in params) == 5_806_080
    for name, p in list(unet.named_parameters()):  # materialise just the LoRA weights
        if "lora_" in name:
            mod, attr = name.rsplit(".", 1)
            setattr(unet.get_submodule(mod), attr, torch.nn.Parameter(torch.zeros(p.shape)))
    info = dict(base_model="x", rank=4, alpha=4, steps=1, resolution=1024, learning_rate=1e-4,
                target_modules=inject.UNET_TARGETS, architecture=models.architecture(unet.config))
    for dtype, mb in ((torch.float32, 23.2), (torch.float16, 11.6)):
        sd = inject.lora_state_dict(unet, "unet", dtype)
        assert inject.count_params(sd) == 5_806_080
        # 70 transformer blocks (down 2x2 + 2x10, mid 10, up 3x10 + 3x2) x 2 attentions x 4 projections x down/up
        assert len(sd) == 70 * 2 * 4 * 2
        path = tmp_path / f"{dtype}.safetensors"
        save_safetensors(sd, path, {"format": "pt", **header(info)})
        weights = sum(v.numel() * v.element_size() for v in sd.values())
        assert round(weights / 1e6, 1) == mb, weights  # 23,224,320 / 11,612,160 bytes of weights
        assert 0 < path.stat().st_size - weights < 0.2e6  # + the header: 1,120 key names and the metadata
    assert header(info)["ss_base_model_version"] == "sdxl_base_v1-0"
