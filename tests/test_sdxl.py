"""SDXL training from the same two scripts: both text encoders, pooled text and per-image size/crop time ids,
LoRA on both encoders, diffusers' SDXL file layout, kohya's lora_te1_/lora_te2_ keys, exact resume and DDP."""
import logging
import subprocess

import numpy as np
import torch
from PIL import Image
from conftest import make_images
from helpers import DREAMBOOTH, ROOT, T2I, accelerate_launch, env, fast_flags, read_lora, recipe_error, run

from sdlora.recipes import text_to_image as t2i
from sdlora.testing import photo_folder
from sdlora.training import conditioning

torch.set_num_threads(1)


def _xl_flags(model, out, **over):
    """fast_flags at the SDXL tiny model's own size: no --resolution (an SDXL base's default is its own)."""
    return fast_flags(model, out, **{"resolution": None, **over})


def _pipe(model):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe):
    return pipe("a red square on a blue background", num_inference_steps=4,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def _loads_cleanly(pipe, lora, caplog):
    """diffusers' own load_lora_weights, with no missing/unexpected-key complaint."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(lora))
    bad = [r.getMessage() for r in caplog.records
           if any(w in r.getMessage().lower() for w in ("unexpected", "missing", "not found", "could not"))]
    assert not bad, bad


# ---------------------------------------------------------------- conditioning

def test_conditioning_is_what_diffusers_sdxl_pipeline_encodes(sdxl_model):
    """Penultimate hidden states of both encoders side by side, and text_encoder_2's pooled projection:
    exactly StableDiffusionXLPipeline.encode_prompt's prompt_embeds and pooled_prompt_embeds."""
    pipe = _pipe(sdxl_model)
    prompts = ["a red square", "two blue circles on a green background"]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    with torch.no_grad():
        text = conditioning.encode([pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2], prompts)
    torch.testing.assert_close(text.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(text.pooled, pooled, rtol=0, atol=0)
    # time ids in the pipeline's order: original (h, w) + crop (top, left) + target (h, w)
    ids = pipe._get_add_time_ids((96, 64), (16, 0), (64, 64), torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    kw = conditioning.unet_kwargs(text[:1], torch.tensor([[96, 64, 16, 0, 64, 64]]), "cpu", torch.float32)
    torch.testing.assert_close(kw["added_cond_kwargs"]["time_ids"], ids)


def test_unet_sees_each_images_size_crop_and_pooled_text(sdxl_model, tmp_path, monkeypatch, capsys):
    """Mixed aspect ratios: every UNet call gets, per row, its image's original (h, w), its crop's (top, left)
    and its bucket (h, w) as time ids, with the pooled text of the second encoder."""
    from diffusers import UNet2DConditionModel

    from sdlora.data.buckets import Bucketing
    from sdlora.data.trainset import layout

    seen, forward = [], UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=None, **k):
        seen.append((tuple(sample.shape), encoder_hidden_states.shape[-1], added_cond_kwargs["text_embeds"].shape,
                     [tuple(int(v) for v in row) for row in added_cond_kwargs["time_ids"]]))
        return forward(self, sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=added_cond_kwargs, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    data = photo_folder(tmp_path / "photos")
    assert t2i.main(_xl_flags(sdxl_model, tmp_path / "o", train_data_dir=data, center_crop=True, train_batch_size=1,
                              max_train_steps=6)) == 0
    assert "base model: SDXL" in capsys.readouterr().err
    b = Bucketing(64, step=8)  # the tiny SDXL model's multiple: VAE x4, UNet x2
    table = b.table()
    expected = set()
    for p in sorted(data.glob("*.png")):
        w, h = Image.open(p).size
        bucket = b.assign((w, h), table)
        if bucket:
            expected.add(layout((w, h), bucket, True, False, None).geometry())
    assert len(seen) == 6
    for shape, width, pooled, ids in seen:
        assert width == 64 and tuple(pooled) == (1, 32)  # 32 + 32 hidden; te2's projection_dim
        (h, w), row = shape[-2:], ids[0]
        assert (row[4] // 4, row[5] // 4) == (h, w)  # the target size is the latents' bucket
        assert tuple(row) in expected, (row, expected)


# ---------------------------------------------------------------- what a run writes

def test_sdxl_text_to_image_loads_in_diffusers_and_kohyas_layout(sdxl_model, tmp_path, caplog):
    data = make_images(tmp_path / "d", n=4, size=80)
    out = tmp_path / "o"
    r = run(T2I, _xl_flags(sdxl_model, out, train_data_dir=data, max_train_steps=4))
    assert r.stderr.count("base model: SDXL") == 1
    sd, meta = read_lora(out / "pytorch_lora_weights.safetensors")
    assert sd and all(k.startswith("unet.") for k in sd)
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["modelspec.resolution"]) == \
        ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "64x64")  # the base's own size by default
    card = (out / "README.md").read_text()
    assert "| base model family | SDXL |" in card and "StableDiffusionXLPipeline.from_pretrained" in card
    assert "- stable-diffusion-xl\n" in card and "- stable-diffusion\n" not in card  # diffusers' SDXL card tags

    pipe = _pipe(sdxl_model)
    before = _images(pipe)
    _loads_cleanly(pipe, out, caplog)
    trained = _images(pipe)
    assert np.abs(trained - before).max() > 1e-4, "the LoRA did not change the images"
    pipe.unload_lora_weights()
    assert np.array_equal(_images(pipe), before)
    kohya, _ = read_lora(out / "o.safetensors")
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    _loads_cleanly(pipe, out / "o.safetensors", caplog)
    assert np.abs(_images(pipe) - trained).max() <= 1e-5


def test_sdxl_dreambooth_with_both_text_encoders_and_prior_preservation(sdxl_model, tmp_path, caplog):
    inst = make_images(tmp_path / "inst", n=3, size=64, captions=False)
    out = tmp_path / "o"
    r = run(DREAMBOOTH, _xl_flags(sdxl_model, out, instance_data_dir=inst, instance_prompt="a photo of sks square",
                                  with_prior_preservation=True, class_prompt="a photo of a square", num_class_images=2,
                                  sample_batch_size=2, class_data_dir=tmp_path / "class", train_text_encoder=True,
                                  max_train_steps=3))
    assert r.stderr.count("base model: SDXL") == 1
    classes = sorted((tmp_path / "class").glob("*.png"))
    assert len(classes) == 2 and all(Image.open(p).size == (64, 64) for p in classes)
    sd, _ = read_lora(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in sd} == {"unet", "text_encoder", "text_encoder_2"}
    kohya, _ = read_lora(out / "o.safetensors")
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}

    pipe = _pipe(sdxl_model)
    before = _images(pipe)
    _loads_cleanly(pipe, out, caplog)
    assert any("lora_A" in n for n, _ in pipe.text_encoder_2.named_parameters())
    trained = _images(pipe)
    assert np.abs(trained - before).max() > 1e-4
    pipe.unload_lora_weights()
    assert np.array_equal(_images(pipe), before)
    _loads_cleanly(pipe, out / "o.safetensors", caplog)
    assert np.abs(_images(pipe) - trained).max() <= 1e-5


def test_sdxl_resume_is_exact_with_both_text_encoders(sdxl_model, tmp_path):
    """Nothing cached (random flips, text encoders trained): 4 steps straight = 2 steps, killed, resumed."""
    data = make_images(tmp_path / "d", n=4, size=64)
    flags = dict(train_data_dir=data, train_text_encoder=True, random_flip=True, checkpointing_steps=2)
    run(T2I, _xl_flags(sdxl_model, tmp_path / "a", **flags))
    run(T2I, _xl_flags(sdxl_model, tmp_path / "b", **flags, max_train_steps=2))
    (tmp_path / "b" / "pytorch_lora_weights.safetensors").unlink()
    assert (tmp_path / "b" / "checkpoint-2" / "text_encoder_2_lora.safetensors").is_file()
    r = run(T2I, _xl_flags(sdxl_model, tmp_path / "b", **flags, resume_from_checkpoint="latest"))
    assert "resumed from" in r.stderr
    a, _ = read_lora(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b, _ = read_lora(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_sdxl_two_processes_write_one_lora(sdxl_model, tmp_path):
    data = make_images(tmp_path / "d", n=4, size=64)
    out = tmp_path / "o"
    cmd = accelerate_launch(T2I, _xl_flags(sdxl_model, out, train_data_dir=data, max_train_steps=2,
                                           train_text_encoder=True))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 procs" in r.stderr
    assert r.stderr.count("saved " + str(out / "pytorch_lora_weights.safetensors")) == 1
    assert sorted(p.name for p in out.iterdir() if p.name[0] != ".") == ["README.md", "o.safetensors",
                                                                  "pytorch_lora_weights.safetensors",
                                                                  "sdlora-config.toml"]
    sd, _ = read_lora(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in sd} == {"unet", "text_encoder", "text_encoder_2"}


# ---------------------------------------------------------------- SDXL flags

def test_a_pretrained_vae_folder_without_a_vae_is_one_line(sdxl_model, tmp_path, capsys, no_model_loads):
    """--pretrained_vae_model_name_or_path pointing at a folder that is not a VAE: one line before anything loads."""
    data = make_images(tmp_path / "d", n=2, size=64)
    msg = recipe_error(capsys, t2i, _xl_flags(sdxl_model, tmp_path / "x", train_data_dir=data,
                                              pretrained_vae_model_name_or_path=data))
    assert msg == f"error: --pretrained_vae_model_name_or_path {data}: not a VAE folder (no config.json)"
    unet = sdxl_model / "unet"  # a folder with a config.json, of another model
    msg = recipe_error(capsys, t2i, _xl_flags(sdxl_model, tmp_path / "y", train_data_dir=data,
                                              pretrained_vae_model_name_or_path=unet))
    assert msg == (f"error: --pretrained_vae_model_name_or_path {unet}: its config.json describes a "
                   f"UNet2DConditionModel, not a VAE (AutoencoderKL); give the VAE's folder")


def test_pretrained_vae_changes_the_latents(sdxl_model, tmp_path):
    """The base's own VAE given as a folder trains byte-identically to no flag; another VAE trains otherwise."""
    import shutil

    from diffusers import AutoencoderKL

    data = make_images(tmp_path / "d", n=2, size=64)
    same = tmp_path / "same-vae"
    shutil.copytree(sdxl_model / "vae", same)
    other = tmp_path / "other-vae"
    vae = AutoencoderKL.from_pretrained(sdxl_model / "vae")
    torch.manual_seed(1)
    for p in vae.parameters():
        p.data += 0.05 * torch.randn_like(p)
    vae.save_pretrained(other)
    outs = {}
    for name, vae_flag in (("base", None), ("same", same), ("other", other)):
        run(T2I, _xl_flags(sdxl_model, tmp_path / name, train_data_dir=data, max_train_steps=2,
                           pretrained_vae_model_name_or_path=vae_flag))
        outs[name] = read_lora(tmp_path / name / "pytorch_lora_weights.safetensors")[0]
    assert all(torch.equal(outs["base"][k], outs["same"][k]) for k in outs["base"])
    assert any(not torch.equal(outs["base"][k], outs["other"][k]) for k in outs["base"])


def test_sdxl_refuses_sd1_only_tokenizer_flags(sdxl_model, tmp_path, capsys, no_model_loads):
    from sdlora.recipes import dreambooth as db

    inst = make_images(tmp_path / "i", n=2, size=64, captions=False)
    msg = recipe_error(capsys, db, _xl_flags(sdxl_model, tmp_path / "o", instance_data_dir=inst, instance_prompt="sks",
                                             tokenizer_max_length=20))
    assert msg == f"error: --tokenizer_max_length is not used with an SDXL base ({sdxl_model}); drop it"


def test_the_bundled_sdxl_model_trains_at_its_own_size(tmp_path):
    """sdlora-tiny-xl by its short name, no --resolution: 32 px (its UNet's sample size x its VAE's factor)."""
    out = tmp_path / "o"
    r = run(T2I, _xl_flags("sdlora-tiny-xl", out, train_data_dir=ROOT / "examples" / "data" / "pokemon",
                           max_train_samples=8, max_train_steps=2))
    assert r.stderr.count("base model: SDXL") == 1
    _, meta = read_lora(out / "pytorch_lora_weights.safetensors")
    assert (meta["ss_base_model_version"], meta["modelspec.resolution"], meta["ss_sd_model_name"]) == \
        ("sdxl_base_v1-0", "32x32", "sdlora-tiny-xl")


# ---------------------------------------------------------------- review fixes

def test_min_snr_weights_stay_finite_at_zero_terminal_snr():
    """--zero_terminal_snr makes SNR exactly 0 at the last step; --snr_gamma's epsilon weight min(snr, γ)/snr is 1
    there (its limit), not 0/0."""
    from diffusers import DDPMScheduler

    from sdlora.tiny import SCHEDULE
    from sdlora.training import losses

    t = torch.tensor([999, 500, 10])
    for prediction in ("epsilon", "v_prediction"):
        sched = DDPMScheduler(**SCHEDULE, prediction_type=prediction, rescale_betas_zero_snr=True)
        w = losses.snr_weights(sched, t, 5.0)
        assert torch.isfinite(w).all(), (prediction, w)
        plain = losses.snr_weights(DDPMScheduler(**SCHEDULE, prediction_type=prediction), t, 5.0)
        assert torch.isfinite(plain).all()
    assert losses.snr_weights(DDPMScheduler(**SCHEDULE, rescale_betas_zero_snr=True), t, 5.0)[0] == 1.0


def test_samples_decode_in_the_vaes_own_dtype_under_autocast(sdxl_model):
    """SDXL's VAE stays fp32 under fp16; the sampler's autocast must not run its decode in half precision."""
    from diffusers import AutoencoderKL

    from sdlora.training.validation import decode_in_vae_dtype

    vae = AutoencoderKL.from_pretrained(str(sdxl_model), subfolder="vae")
    z = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    want = vae.decode(z.float()).sample
    with torch.autocast("cpu", dtype=torch.bfloat16), decode_in_vae_dtype(vae, "cpu"):
        got = vae.decode(z).sample
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert "decode" not in vars(vae)  # the class's own method again afterwards


def test_dataset_rows_without_buckets_are_conditioned_on_their_real_size(tmp_path):
    """A `datasets` row (size unknown until decoded) with --no_bucket: SDXL's size/crop ids describe the crop the
    pixels really get, not the square target."""
    from sdlora.data.sources import Row
    from sdlora.data.trainset import TrainSet

    Image.new("RGB", (96, 64), "red").save(tmp_path / "wide.png")
    row = Row(image=lambda: Image.open(tmp_path / "wide.png"), caption="a red square", name="wide", size=None)
    data = TrainSet([row], [[0]], [0], 32, center_crop=True, random_flip=False)
    assert data.rows[0].size == (96, 64)
    assert data.layout(0, 0, 0).geometry() == (64, 96, 0, 8, 32, 32)  # resized to 48x32, centre crop at left 8


def test_resume_refuses_a_flag_the_checkpoint_ran_without():
    """Settings recorded only when used (--zero_terminal_snr, --pretrained_vae…, --adam_weight_decay_text_encoder)
    still count as changes on resume: missing from a checkpoint means their default."""
    from types import SimpleNamespace

    import pytest

    from sdlora.errors import UserError
    from sdlora.training.resume import check

    ckpt = SimpleNamespace(settings={"rank": 4}, seed=0, path="out/checkpoint-2")
    config = SimpleNamespace(seed=None)
    check(config, ckpt, {"rank": 4}, main=True)
    with pytest.raises(UserError, match="zero_terminal_snr false -> true"):
        check(config, ckpt, {"rank": 4, "zero_terminal_snr": True}, main=True)
