"""Stable Diffusion 3 / 3.5 as the fourth family: the tiny SD3 base, its detection, the prompt encoding against
diffusers' StableDiffusion3Pipeline, and the rectified-flow loss and gradients against diffusers' SD3 script's
formula (examples/dreambooth/train_dreambooth_lora_sd3.py), computed here on the same tiny model."""
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdlora import models, sd3base, sd3models
from sdlora.lora import inject
from sdlora.training import flow, sd3cond
from sdlora.training.config import TrainConfig

CAPTIONS = ["a red circle on blue", "a green square"]
ROOT = Path(__file__).resolve().parents[1]
POKEMON = ROOT / "examples/data/pokemon"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory):
    from sdlora.tiny_sd3 import make_sd3

    return make_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3", arch="sd3")


@pytest.fixture(scope="module")
def pipe(sd3_model):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(sd3_model)


def test_tiny_sd3_is_detected_and_sized(sd3_model):
    pipeline_class, config, vae = models.base_configs(str(sd3_model))
    assert pipeline_class == "StableDiffusion3Pipeline" and vae["latent_channels"] == 16
    assert models.family_of(config, pipeline_class) == models.family(str(sd3_model)) == "sd3"
    assert sd3base.variant(config) == "SD3.5 Medium"  # the tiny one has SD3.5 Medium's dual-attention layout
    assert models.architecture(config, family_="sd3") == "stable-diffusion-3-5-medium"
    assert models.size_multiple(config, vae) == 4 * 2  # VAE factor x patch size
    from sdlora.tiny_sd3 import SD3_ARCHS

    assert sd3base.variant(SD3_ARCHS["sd35-large"]["transformer"]) == "SD3.5 Large"
    assert sd3base.variant(dict(SD3_ARCHS["sd35-large"]["transformer"], qk_norm=None)) == "SD3"


def test_lora_targets_follow_diffusers_sd3_script():
    assert sd3base.lora_targets(None, None) == list(sd3base.TRANSFORMER_TARGETS)
    assert sd3base.lora_targets("attn.to_q,attn.to_k", "0,2") == [
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
        "transformer_blocks.2.attn.to_q", "transformer_blocks.2.attn.to_k"]


@pytest.mark.parametrize("drop_t5", [False, True])
def test_prompt_encoding_matches_the_pipeline(sd3_model, pipe, drop_t5):
    names = sd3base.TEXT_ENCODERS
    tokenizers = [sd3models.load_tokenizer(str(sd3_model), n.replace("text_encoder", "tokenizer")) for n in names]
    encoders = [getattr(pipe, n) for n in names[:2]] + [None if drop_t5 else pipe.text_encoder_3]
    joint = pipe.transformer.config.joint_attention_dim
    with torch.no_grad():
        ours = sd3cond.encode(encoders, tokenizers, CAPTIONS, 77, joint)
        reference = copy.copy(pipe)
        if drop_t5:
            reference.text_encoder_3 = None
        embeds, _, pooled, _ = reference.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=False,
                                                       max_sequence_length=77)
    assert ours.embeds.shape == (2, 77 + 77, joint)
    torch.testing.assert_close(ours.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)


def _script_loss(transformer, sched, model_input, noise, prompt_embeds, pooled, args, gen):
    """diffusers' train_dreambooth_lora_sd3.py, its training step written out (get_sigmas by timestep lookup)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    u = compute_density_for_timestep_sampling(weighting_scheme=args.weighting_scheme, batch_size=model_input.shape[0],
                                              logit_mean=args.logit_mean, logit_std=args.logit_std,
                                              mode_scale=args.mode_scale, generator=gen)
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices]
    step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = sched.sigmas[step_indices].flatten()[:, None, None, None]
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    model_pred = transformer(hidden_states=noisy_model_input, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                             pooled_projections=pooled, return_dict=False)[0]
    if args.precondition_outputs:
        model_pred = model_pred * (-sigmas) + noisy_model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
    target = model_input if args.precondition_outputs else noise - model_input
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return loss.mean()


@pytest.mark.parametrize("scheme,precondition", [("logit_normal", 1), ("cosmap", 0), ("mode", 1)])
def test_flow_loss_and_gradients_match_diffusers_sd3_script(sd3_model, pipe, scheme, precondition):
    config = TrainConfig(base_name="x", weighting_scheme=scheme, precondition_outputs=precondition)
    transformer = sd3models.load_transformer(str(sd3_model))
    inject.add_lora(transformer, inject.lora_config(4, 4, sd3base.lora_targets(None, None)))
    for n, p in transformer.named_parameters():  # B != 0, so the LoRA changes the output and has gradients to A
        if "lora_B" in n:
            torch.nn.init.normal_(p.data, std=0.02)
    sched = sd3models.load_scheduler(str(sd3_model))
    torch.manual_seed(0)
    sample = torch.randn(2, 16, 8, 8)
    lat = flow.latents(sample, pipe.vae.config)
    noise = torch.randn(lat.shape)
    with torch.no_grad():
        text = sd3cond.encode([pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
                              [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3], CAPTIONS, 77, 64)
    lora = [p for n, p in transformer.named_parameters() if "lora_" in n]

    noised = flow.noise(sched, lat, noise, config, torch.Generator().manual_seed(7))
    pred = transformer(hidden_states=noised.noisy, timestep=noised.timesteps, return_dict=False,
                       **sd3cond.transformer_kwargs(text, "cpu", torch.float32))[0]
    ours = flow.per_sample_loss(pred, lat, noise, noised, config).mean()
    ours_grads = torch.autograd.grad(ours, lora)

    model_input = (sample - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    args = SimpleNamespace(weighting_scheme=scheme, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                           precondition_outputs=precondition)
    theirs = _script_loss(transformer, sched, model_input, noise, text.embeds, text.pooled, args,
                          torch.Generator().manual_seed(7))
    theirs_grads = torch.autograd.grad(theirs, lora)
    assert ours.item() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in ours_grads)


@pytest.mark.parametrize("flags,said", [({"snr_gamma": 5}, "--snr_gamma: a UNet noise/loss option"),
                                        ({"upcast_before_saving": True, "save_precision": "bf16"},
                                         "--upcast_before_saving saves the LoRA in fp32, --save_precision bf16")])
def test_sd3_refuses_what_it_does_not_do_in_one_line(sd3_model, tmp_path, capsys, flags, said):
    from helpers import fast_flags, recipe_error

    from sdlora.recipes import text_to_image as t2i

    assert said in recipe_error(capsys, t2i, fast_flags(sd3_model, tmp_path / "o", train_data_dir=POKEMON, **flags))


@pytest.mark.parametrize("flags,flag", [({"drop_t5": True}, "drop_t5"), ({"weighting_scheme": "mode"}, "weighting_scheme"),
                                        ({"max_sequence_length": 256}, "max_sequence_length")])
def test_sd3_settings_on_another_family_are_one_line(tiny_model, tmp_path, capsys, no_model_loads, flags, flag):
    """An SD3-only setting given with an SD 1.x base is refused before any model loads, not silently ignored."""
    from helpers import fast_flags, recipe_error

    from sdlora.recipes import text_to_image as t2i

    line = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=POKEMON, **flags))
    assert line.startswith(f"error: --{flag} is an SD3 / 3.5 setting, not used with an SD 1.x base"), line


def test_make_tiny_cli_writes_an_sd3_pipeline(tmp_path, capsys):
    from sdlora.cli import main

    assert main(["make-tiny", str(tmp_path / "sd3"), "--arch", "sd3"]) == 0
    assert "StableDiffusion3Pipeline" in capsys.readouterr().out
    assert models.family(str(tmp_path / "sd3")) == "sd3"


def test_real_sd3_architectures():
    """The benchmark architectures are Stability's: SD3.5 Large's MMDiT has its published 8.1 B parameters, and SD3.5
    Medium's without its dual-attention (MMDiT-X) blocks and qk norm is SD3 Medium's 2 B; built on the meta device."""
    from diffusers import SD3Transformer2DModel

    from sdlora.tiny_sd3 import SD3_ARCHS

    def count(config):
        with torch.device("meta"):
            return sum(p.numel() for p in SD3Transformer2DModel(**config).parameters())

    medium, large = SD3_ARCHS["sd35-medium"]["transformer"], SD3_ARCHS["sd35-large"]["transformer"]
    assert abs(count(large) / 8.1e9 - 1) < 0.01
    sd3_medium = dict(medium, dual_attention_layers=(), qk_norm=None)
    assert abs(count(sd3_medium) / 2.0e9 - 1) < 0.02 and count(medium) > count(sd3_medium)
    assert [sd3base.variant(c) for c in (medium, large, sd3_medium)] == ["SD3.5 Medium", "SD3.5 Large", "SD3"]


# ---------------------------------------------------------------- end to end, loaded by diffusers as it is
def _pipe(model, **kw):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe):
    return pipe("a red square on a blue background", num_inference_steps=3, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def _loads_whole(pipe, out, caplog) -> dict:
    """diffusers' own load_lora_weights, with no missing/unexpected-key complaint, every tensor of the file landing
    in a LoRA layer of its component; returns the file's tensors."""
    import logging

    from safetensors.torch import load_file

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(out))
    bad = [r.getMessage() for r in caplog.records  # "No LoRA keys associated to <an untrained encoder>": no complaint
           if any(w in r.getMessage().lower() for w in ("unexpected", "missing", "not found", "could not"))
           and not r.getMessage().startswith("No LoRA keys associated")]
    assert not bad, bad
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    for comp in {k.split(".")[0] for k in sd}:
        loaded = [n for n, _ in getattr(pipe, comp).named_parameters() if ".lora_" in n]
        assert len(loaded) == sum(k.startswith(comp + ".") for k in sd), comp
    return sd


@pytest.fixture(scope="module")
def t2i_out(sd3_model, tmp_path_factory):
    """The text-to-image script as a user runs it on a machine with several devices (`accelerate launch
    --num_processes 2 --mixed_precision bf16`: DDP over gloo; a subprocess, its one real run here), the CLIPs
    trained too, alpha != rank so a loader that ignores alpha draws something else: (output folder, stderr)."""
    import subprocess

    from helpers import T2I, accelerate_launch, env, fast_flags

    out = tmp_path_factory.mktemp("t2i") / "o"
    cmd = accelerate_launch(T2I, fast_flags(sd3_model, out, train_data_dir=POKEMON, max_train_samples=4,
                                            train_text_encoder=True, max_train_steps=2, rank=2, lora_alpha=4),
                            mixed_precision="bf16")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


def train(model, out, **flags) -> Path:
    """A text-to-image run in-process (the script's own main; a subprocess adds an interpreter start of seconds)."""
    from helpers import fast_flags

    from sdlora.recipes import text_to_image as t2i

    assert t2i.main(fast_flags(model, out, **{"train_data_dir": POKEMON, "max_train_samples": 4, **flags})) == 0
    return out


def test_sd3_text_to_image_with_text_encoders_loads_in_diffusers(sd3_model, t2i_out, tmp_path, caplog):
    """diffusers draws with the script's file what sdlora's loader and `sdlora generate` draw, and not the base's."""
    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    from sdlora import toolkit
    from sdlora.cli import main
    from sdlora.pipeline import load_pipeline

    out, stderr = t2i_out
    assert stderr.count("base model: SD3.5 Medium") == 1
    assert "x 2 procs" in stderr and "frozen weights in bfloat16" in stderr  # DDP, bf16: one set of outputs
    assert stderr.count("saved " + str(out / "pytorch_lora_weights.safetensors")) == 1
    meta = safe_open(out / "pytorch_lora_weights.safetensors", "pt").metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora" and meta["ss_base_model_version"] == "sd3_m"
    assert meta["sdlora_target_modules"] == ",".join(sd3base.TRANSFORMER_TARGETS)
    assert "architecture:   SD3" in toolkit.inspect_file(str(out), False)
    card = (out / "README.md").read_text()
    assert "StableDiffusion3Pipeline.from_pretrained" in card and "kohya" not in card
    pipe = _pipe(sd3_model)
    before = _images(pipe)
    sd = _loads_whole(pipe, out, caplog)
    assert {k.split(".")[0] for k in sd} == {"transformer", "text_encoder", "text_encoder_2"}
    assert any(".attn.add_q_proj." in k for k in sd) and any(".attn.to_q." in k for k in sd)  # both streams
    trained = _images(pipe)
    assert np.abs(trained - before).max() > 1e-4
    ours = _images(load_pipeline([str(out)], base=str(sd3_model), device="cpu", dtype="fp32"))
    assert np.abs(ours - trained).max() <= 1e-5
    pipe.unload_lora_weights()
    assert np.array_equal(_images(pipe), before)

    assert main(["generate", "a red square on a blue background", "--lora", str(out), "--base", str(sd3_model),
                 "--seed", "0", "--steps", "3", "--width", "32", "--height", "32", "--dtype", "fp32",
                 "--device", "cpu", "--out", str(tmp_path / "gen")]) == 0
    png = next((tmp_path / "gen").glob("*.png"))
    params = json.loads(Image.open(png).text["sdlora"])
    assert params["guidance"] == 7.0  # StableDiffusion3Pipeline's own default
    # what drew it: the base's own FlowMatch Euler (--scheduler dpm++, the default, keeps it on SD3), as A1111 names it
    assert params["scheduler"] == "flow-match-euler"
    assert "Sampler: Euler, CFG scale: 7" in Image.open(png).text["parameters"]
    png = np.asarray(Image.open(png), dtype=np.float32) / 255
    assert np.abs(png - ours[0]).max() <= 1.5 / 255  # the same image (the pipeline's default guidance), in 8 bits


def test_sd3_dreambooth_prior_preservation_and_text_encoders(sd3_model, tmp_path, caplog):
    """The DreamBooth script as a user runs it (its one real run here)."""
    import numpy as np
    from conftest import make_images
    from helpers import DREAMBOOTH, fast_flags, run
    from PIL import Image

    inst, out = make_images(tmp_path / "inst", n=3, size=32, captions=False), tmp_path / "o"
    r = run(DREAMBOOTH, fast_flags(sd3_model, out, instance_data_dir=inst, instance_prompt="a photo of sks square",
                                   with_prior_preservation=True, class_prompt="a photo of a square",
                                   num_class_images=2, sample_batch_size=2, class_data_dir=tmp_path / "class",
                                   train_text_encoder=True, max_train_steps=2))
    assert r.stderr.count("base model: SD3.5 Medium") == 1
    classes = sorted((tmp_path / "class").glob("*.png"))
    assert len(classes) == 2 and all(Image.open(p).size == (32, 32) for p in classes)
    pipe = _pipe(sd3_model)
    before = _images(pipe)
    sd = _loads_whole(pipe, out, caplog)
    assert {k.split(".")[0] for k in sd} == {"transformer", "text_encoder", "text_encoder_2"}
    trained = _images(pipe)
    assert np.abs(trained - before).max() > 1e-4
    from sdlora.pipeline import load_pipeline

    assert np.abs(_images(load_pipeline([str(out)], base=str(sd3_model), device="cpu", dtype="fp32")) - trained).max() <= 1e-5


def test_sd3_text_encoders_leave_before_the_vae_encodes_the_images(sd3_model, tmp_path, monkeypatch):
    """Caching encodes the prompts first and releases the three text encoders (T5-XXL alone is 9 GiB) before the VAE
    encodes the images: the caching phase's peak is the larger of the two, not their sum (docs/sd3.md)."""
    from diffusers import AutoencoderKL

    events, release, encode = [], models.release, AutoencoderKL.encode
    monkeypatch.setattr(models, "release", lambda m, device: events.append(type(m).__name__) or release(m, device))
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, *a, **k: events.append("encode") or encode(self, *a, **k))
    train(sd3_model, tmp_path / "o", max_train_steps=1)
    first = events.index("encode")
    assert sorted(events[:first]) == ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"], events
    assert events[first:].count("AutoencoderKL") == 1  # and the VAE leaves once the latents are cached


def test_sd3_without_t5_trains_and_draws_without_t5(sd3_model, tmp_path, caplog, capsys):
    import numpy as np

    out = train(sd3_model, tmp_path / "o", drop_t5=True, max_sequence_length=16, lora_blocks="1", max_train_steps=2,
                upcast_before_saving=True)  # diffusers' flag, accepted: the LoRA is saved in fp32 anyway
    assert "T5 dropped" in capsys.readouterr().err
    pipe = _pipe(sd3_model, text_encoder_3=None, tokenizer_3=None)
    before = _images(pipe)
    sd = _loads_whole(pipe, out, caplog)
    assert sd and all(k.startswith("transformer.transformer_blocks.1.") for k in sd)  # --lora_blocks 1
    assert {v.dtype for v in sd.values()} == {torch.float32}
    assert np.abs(_images(pipe) - before).max() > 1e-4


def test_sd3_resume_is_exact(sd3_model, tmp_path, capsys):
    """Nothing cached (text encoders trained, random flips): 4 steps straight = 2 steps, then resumed for 2."""
    from safetensors.torch import load_file

    flags = dict(train_text_encoder=True, random_flip=True, checkpointing_steps=2, weighting_scheme="mode")
    train(sd3_model, tmp_path / "a", **flags)
    train(sd3_model, tmp_path / "b", **flags, max_train_steps=2)
    capsys.readouterr()
    train(sd3_model, tmp_path / "b", **flags, resume_from_checkpoint="latest")
    assert "resumed from" in capsys.readouterr().err
    a, b = (load_file(tmp_path / d / "pytorch_lora_weights.safetensors") for d in "ab")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_load_pipeline_keeps_the_sd3_bases_flow_match_scheduler(sd3_model):
    import numpy as np

    from sdlora.pipeline import load_pipeline

    ours = load_pipeline(base=str(sd3_model), device="cpu", dtype="fp32")
    assert type(ours).__name__ == "StableDiffusion3Pipeline"
    assert type(ours.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert np.array_equal(_images(ours), _images(_pipe(sd3_model)))


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_sd3_draws_validation_and_sample_prompts_while_training(sd3_model, tmp_path, caplog, monkeypatch,
                                                                train_text_encoder):
    """--validation_prompt and --sample_prompts on an SD3 base: StableDiffusion3Pipeline over the run's models with the
    base's FlowMatch schedule. The last round draws, with the weights the run saves, what diffusers draws loading the
    saved file into an unmodified pipeline at the same seed and guidance. Frozen encoders: the prompts were encoded up
    front (no text encoder loads again to sample); trained CLIPs: encoded with their LoRA when drawn."""
    import numpy as np
    from PIL import Image

    from sdlora import sd3models as loads
    from sdlora.training import sd3sample

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --n blurry --s 3 --l 4 --d 5 --w 32 --h 32\n")
    loaded = []
    real = loads.load_text_encoder
    monkeypatch.setattr(loads, "load_text_encoder", lambda *a, **k: loaded.append(a[1]) or real(*a, **k))
    monkeypatch.setattr(models, "fast_precision", lambda device: "fp32")  # the run samples in fp32, as diffusers here
    out = train(sd3_model, tmp_path / "o", validation_prompt="a green square", num_validation_images=1,
                sample_prompts=prompts, max_train_steps=2, train_text_encoder=train_text_encoder, learning_rate=0.05)
    assert loaded == list(sd3base.TEXT_ENCODERS)  # each once, before training: none again to sample
    val, step = Image.open(out / "samples/latest_0.png"), Image.open(out / "samples/step000002_00.png")
    recorded = json.loads(step.text["sdlora"])
    assert (recorded["scheduler"], recorded["guidance"], recorded["seed"]) == (sd3sample.SCHEDULER, 4.0, 5)
    pipe = _pipe(sd3_model)

    def theirs(prompt, negative, seed, steps, guidance):
        return pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance, height=32,
                    width=32, max_sequence_length=77, generator=torch.Generator().manual_seed(seed),
                    output_type="np").images[0]
    base = theirs("a red square", "blurry", 5, 3, 4.0)
    _loads_whole(pipe, out, caplog)
    for png, want in ((step, theirs("a red square", "blurry", 5, 3, 4.0)),
                      (val, theirs("a green square", "", 0, 25, 7.0))):  # the run's seed, the pipeline's guidance
        assert np.abs(np.asarray(png, dtype=np.float32) / 255 - want).max() <= 1 / 255  # 8-bit rounding
    assert np.abs(np.asarray(step, dtype=np.float32) / 255 - base).max() > 8 / 255  # drawn with the LoRA


@pytest.mark.parametrize("flags", [{"lora_type": "dora", "train_text_encoder": True},
                                   {"init_lora_weights": "olora", "use_rslora": True},
                                   {"lora_type": "loha", "train_text_encoder": True}, {"lora_type": "lokr"},
                                   {"lora_type": "adalora", "train_text_encoder": True, "adalora_init_r": 4,
                                    "adalora_tinit": 0, "adalora_tfinal": 1, "learning_rate": 0.3}, {"lora_alpha": 8}])
def test_sd3_lora_variants_load_as_trained(sd3_model, tmp_path, caplog, monkeypatch, flags):
    """DoRA, OLoRA init (PiSSA's path), LoHa/LoKr, AdaLoRA (saved pruned, as plain LoRA at each layer's final rank)
    and an alpha other than the rank on SD3 through peft, as on SD 1.x/XL. The file, loaded into the
    unmodified base, draws what the run drew with its own trained models at its end (a sample prompt; OLoRA changed
    the run's frozen weights, the file holds the change from the base): by sdlora's loader, and by an unmodified
    StableDiffusion3Pipeline where diffusers reads the type (not LoHa/LoKr, as on SD 1.x/XL)."""
    import numpy as np
    from PIL import Image

    from sdlora.pipeline import load_pipeline

    monkeypatch.setattr(models, "fast_precision", lambda device: "fp32")
    (tmp_path / "p.txt").write_text("a green square --s 3 --l 4 --d 0 --w 32 --h 32\n")
    out = train(sd3_model, tmp_path / "o", sample_prompts=tmp_path / "p.txt", max_train_steps=2,
                **{"learning_rate": 0.05, "rank": 2, **flags})  # AdaLoRA's singular values start at 0: a larger lr
    kw = dict(num_inference_steps=3, guidance_scale=4.0, height=32, width=32, max_sequence_length=77, output_type="np")
    card = (out / "README.md").read_text()
    if flags.get("lora_type") in ("loha", "lokr", "dora"):  # kohya's SD3 layout fuses q/k/v: no second file, and
        assert not (out / "o.safetensors").exists() and "o.safetensors" not in card  # the card does not name one
        assert "No kohya-layout copy was written" in card
    else:
        assert (out / "o.safetensors").is_file() and "`o.safetensors`" in card

    def draw(pipe):
        return pipe("a green square", generator=torch.Generator().manual_seed(0), **kw).images[0]
    run = np.asarray(Image.open(out / "samples/step000002_00.png"), dtype=np.float32) / 255
    ours = draw(load_pipeline([str(out)], base=str(sd3_model), device="cpu", dtype="fp32"))
    assert np.abs(run - ours).max() <= 1 / 255 < np.abs(ours - draw(_pipe(sd3_model))).max()
    if flags.get("lora_type") in ("loha", "lokr"):
        return
    pipe = _pipe(sd3_model)
    sd = _loads_whole(pipe, out, caplog)
    assert any(".lora_magnitude_vector" in k for k in sd) == (flags.get("lora_type") == "dora")
    assert np.abs(draw(pipe) - ours).max() <= 1e-5
    # ComfyUI reads the diffusers SD3 file as it is, with no alpha (scale 1): alpha / rank lives in the up weights,
    # and the header's peft config says alpha = rank, so diffusers (just checked) applies the same scale
    from safetensors import safe_open
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as f:
        packed = json.loads(f.metadata()["lora_adapter_metadata"])
    assert not any(k.endswith(".alpha") for k in sd)
    assert packed["transformer.lora_alpha"] == packed["transformer.r"]
    assert packed.get("transformer.alpha_pattern", {}) == packed.get("transformer.rank_pattern", {})

