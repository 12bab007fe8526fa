"""The bundled tiny pretrained model, its detector, example data sets and scripts (all fast, CPU)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = ROOT / "sdlora" / "assets" / "tiny-sd"
XL_MODEL = ROOT / "sdlora" / "assets" / "tiny-sdxl"
SD3_MODEL = ROOT / "sdlora" / "assets" / "tiny-sd3"
sys.path.insert(0, str(EXAMPLES))

import shapes  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    import eval_prompt_following as ev

    torch.set_num_threads(1)
    return ev.load_base_pipeline("sdlora-tiny")


def test_bundled_model_is_an_sd_pipeline_under_30mb():
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, size
    assert list(MODEL.rglob("*.bin")) == [] and len(list(MODEL.rglob("*.safetensors"))) == 3
    p = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    assert isinstance(p.unet, UNet2DConditionModel) and p.unet.config.cross_attention_dim
    assert isinstance(p.vae, AutoencoderKL) and isinstance(p.text_encoder, CLIPTextModel)
    cfg = p.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, cfg.clip_sample) == \
        ("scaled_linear", 0.00085, 0.012, 1000, False)


def test_bundled_models_together_stay_under_30mib_and_the_xl_one_is_an_sdxl_pipeline():
    from diffusers import StableDiffusionXLPipeline

    from sdlora import models

    size = sum(f.stat().st_size for f in (ROOT / "sdlora" / "assets").rglob("*") if f.is_file())
    assert size <= 30 * 2**20, size
    assert list(XL_MODEL.rglob("*.bin")) == [] and len(list(XL_MODEL.rglob("*.safetensors"))) == 4
    assert models.family(str(XL_MODEL)) == "sdxl" and models.BUNDLED["sdlora-tiny-xl"] == XL_MODEL
    p = StableDiffusionXLPipeline.from_pretrained(XL_MODEL)
    u = p.unet.config
    assert u.addition_embed_type == "text_time"
    assert u.cross_attention_dim == p.text_encoder.config.hidden_size + p.text_encoder_2.config.hidden_size
    assert p.config.force_zeros_for_empty_prompt


def test_train_tiny_base_sd3_writes_a_pipeline_an_unmodified_sd3_pipeline_loads_and_draws(tmp_path):
    """--arch sd3 at a smoke size (2 steps): a StableDiffusion3Pipeline folder of safetensors with tiny-sd's
    tokenizer and VAE files reused (shift_factor 0.0 added), latent channels read from the VAE, which an
    unmodified StableDiffusion3Pipeline loads (T5 included) and samples at 32 px; the prompt changes the image."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5EncoderModel

    import train_tiny_base

    from sdlora import models

    out = tmp_path / "tiny-sd3"
    torch.set_num_threads(1)
    train_tiny_base.main(["--arch", "sd3", "--out", str(out), "--unet-steps", "2", "--images", "40", "--batch", "4",
                          "--sd3-layers", "2"])
    assert models.family(str(out)) == "sd3" and list(out.rglob("*.bin")) == []
    assert len(list(out.rglob("*.safetensors"))) == 5
    for name in ("tokenizer", "tokenizer_2"):  # tiny-sd's tokenizer files, as they are
        assert {f.name: f.read_bytes() for f in (out / name).iterdir()} == \
            {f.name: f.read_bytes() for f in (MODEL / "tokenizer").iterdir()}
    vae_cfg = json.loads((out / "vae" / "config.json").read_text())
    assert vae_cfg["shift_factor"] == 0.0 and "_name_or_path" not in vae_cfg  # no path of the building machine
    # the transformer and the VAE (tiny-sd's weights) are stored fp16, the text encoders fp32
    from safetensors.torch import load_file
    vae16, vae32 = (load_file(d / "vae" / "diffusion_pytorch_model.safetensors") for d in (out, MODEL))
    assert vae16.keys() == vae32.keys() and all(vae16[k].dtype == torch.float16 for k in vae16)
    assert all(torch.equal(vae16[k], vae32[k].half()) for k in vae16)
    assert {t.dtype for t in load_file(out / "transformer" / "diffusion_pytorch_model.safetensors").values()} == \
        {torch.float16}
    assert {t.dtype for t in load_file(out / "text_encoder_3" / "model.safetensors").values()} == {torch.float32}
    assert json.loads((out / "training_info.json").read_text())["unet_steps"] == 2
    p = StableDiffusion3Pipeline.from_pretrained(out)
    assert isinstance(p.transformer, SD3Transformer2DModel) and isinstance(p.text_encoder_3, T5EncoderModel)
    assert isinstance(p.scheduler, FlowMatchEulerDiscreteScheduler)
    assert p.transformer.config.in_channels == p.vae.config.latent_channels == vae_cfg["latent_channels"]
    p.set_progress_bar_config(disable=True)
    img = p(["a red circle on a green background", ""], num_inference_steps=2, guidance_scale=3.0,
            max_sequence_length=64, generator=[torch.Generator().manual_seed(0) for _ in range(2)], output_type="np").images
    assert img.shape == (2, shapes.RES, shapes.RES, 3) and np.isfinite(img).all()
    assert np.abs(img[0] - img[1]).mean() > 1e-3  # same seed, different prompts: the text conditions the image


def test_bundled_sd3_model_resolves_loads_in_an_unmodified_sd3_pipeline_and_draws_the_prompted_colours():
    """sdlora-tiny-sd3: the bundled name resolves to an SD3 folder of safetensors (the transformer and VAE stored fp16,
    loaded back fp32), which an unmodified StableDiffusion3Pipeline loads (T5 included) and which follows held-out
    (shape colour, background) pairs with its own FlowMatch scheduler (loose threshold; measured: docs/tiny-model.md)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5EncoderModel

    import eval_prompt_following as ev

    from sdlora import models

    assert models.resolve_base("sdlora-tiny-sd3") == str(SD3_MODEL) and models.family(str(SD3_MODEL)) == "sd3"
    assert list(SD3_MODEL.rglob("*.bin")) == [] and len(list(SD3_MODEL.rglob("*.safetensors"))) == 5
    torch.set_num_threads(1)
    p = StableDiffusion3Pipeline.from_pretrained(SD3_MODEL)
    assert isinstance(p.transformer, SD3Transformer2DModel) and isinstance(p.text_encoder_3, T5EncoderModel)
    assert isinstance(p.scheduler, FlowMatchEulerDiscreteScheduler) and p.transformer.dtype == torch.float32
    assert p.transformer.config.in_channels == p.vae.config.latent_channels
    sd3 = ev.load_base_pipeline("sdlora-tiny-sd3")
    assert type(sd3).__name__ == "StableDiffusion3Pipeline" and type(sd3.scheduler) is FlowMatchEulerDiscreteScheduler
    specs = ev.prompt_specs("heldout", per_prompt=1)[::3][:8]
    images = ev.sample(sd3, [s["prompt"] for s in specs], [s["seed"] for s in specs], steps=20, guidance=3.0, batch=48)
    res = shapes.prompt_following(images, specs)
    assert res["bg"] >= 0.75 and res["colour"] >= 0.75, res


def test_bundled_xl_model_draws_the_prompted_colours():
    """sdlora-tiny-xl through sdlora's own loader: held-out (shape colour, background) pairs, loose threshold."""
    import eval_prompt_following as ev

    torch.set_num_threads(1)
    xl = ev.load_base_pipeline("sdlora-tiny-xl")
    assert type(xl).__name__ == "StableDiffusionXLPipeline"
    specs = ev.prompt_specs("heldout", per_prompt=1)[::3][:8]
    images = ev.sample(xl, [s["prompt"] for s in specs], [s["seed"] for s in specs], steps=20, guidance=6.0, batch=48)
    res = shapes.prompt_following(images, specs)
    assert res["bg"] >= 0.75 and res["colour"] >= 0.75, res


def test_tokenizer_has_one_token_per_caption_word_and_takes_any_text(pipe):
    tok = pipe.tokenizer
    for word in shapes.VOCAB_WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok("a sks square, ünïcode 123!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) > 5


@pytest.mark.parametrize("look", ["plain", "creature"])
def test_detector_reads_rendered_images(look):
    import random

    rng = random.Random(0)
    specs = [shapes.random_spec(rng, pairs=shapes.all_pairs()) for _ in range(60)]
    res = shapes.prompt_following([shapes.render(s, look) for s in specs], specs)
    # >= 0.98 for creatures too: their eyes must leave body colour to read, even on small triangles
    assert res["bg"] == 1.0 and res["shape"] == 1.0 and res["colour"] >= 0.98


def test_style_and_subject_detectors_separate_the_looks():
    import random

    rng = random.Random(1)
    specs = [shapes.random_spec(rng, pairs=shapes.all_pairs()) for _ in range(40)]
    plain = [shapes.render(s) for s in specs]
    creature = [shapes.render(s, "creature") for s in specs]
    subject = [shapes.render(s, "subject") for s in specs]
    assert np.mean([shapes.is_styled(im) for im in plain]) == 0
    assert np.mean([shapes.is_styled(im) for im in creature]) == 1
    assert np.mean([shapes.is_subject(im) for im in plain + creature]) == 0
    assert np.mean([shapes.is_subject(im) for im in subject]) >= 0.95
    # half a checker is not the subject: a square of one of its colours, or with its colours side by side
    for colours in (["cyan"] * 4, ["cyan", "magenta", "cyan", "magenta"]):
        from PIL import Image, ImageDraw

        im = Image.new("RGB", (32, 32), shapes.PALETTE["gray"])
        d = ImageDraw.Draw(im)
        for (x, y), c in zip([(8, 8), (16, 8), (8, 16), (16, 16)], colours):
            d.rectangle([x, y, x + 7, y + 7], fill=shapes.SUBJECT_COLOURS[c])
        assert shapes.subject_score(im) >= 0.5 and not shapes.is_subject(im)


def test_bundled_model_draws_the_prompted_colours(pipe):
    """Held-out (shape colour, background) pairs, fixed seeds; loose threshold."""
    import eval_prompt_following as ev

    specs = ev.prompt_specs("heldout", per_prompt=1)[::3][:8]   # 8 prompts, all 8 held-out pairs
    images = ev.sample(pipe, [s["prompt"] for s in specs], [s["seed"] for s in specs], steps=20, guidance=6.0, batch=48)
    res = shapes.prompt_following(images, specs)
    assert res["bg"] >= 0.75 and res["colour"] >= 0.75, res


def test_eval_script_end_to_end(tmp_path):
    import eval_prompt_following as ev

    out = tmp_path / "res.json"
    ev.main(["--limit", "3", "--steps", "3", "--split", "both", "--json", str(out),
             "--grid", str(tmp_path / "grid.png")])
    res = json.loads(out.read_text())
    assert set(res) == {"heldout", "train"} and res["heldout"]["n"] == 3
    assert (tmp_path / "grid.png").exists()


def test_train_script_end_to_end_tiny_budget(tmp_path):
    import train_tiny_base as tr
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "tiny"
    tr.main(["--out", str(out), "--vae-steps", "2", "--unet-steps", "2", "--images", "32",
             "--vae-images", "32", "--batch", "8", "--vae-batch", "8", "--decoder-steps", "2",
             "--decoder-images", "16"])
    p = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    img = p("a red circle on a blue background", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 32, 32, 3)
    info = json.loads((out / "training_info.json").read_text())
    assert info["unet_steps"] == 2 and info["decoder_steps"] == 2

    # the decoder stage alone changes only the decoder: encoder, UNet and text encoder stay bit-identical
    tr.main(["--decoder-only", str(out), "--out", str(tmp_path / "tuned"), "--decoder-steps", "2",
             "--decoder-images", "16", "--vae-batch", "8"])
    q = StableDiffusionPipeline.from_pretrained(tmp_path / "tuned", safety_checker=None, requires_safety_checker=False)
    for name, a in p.vae.state_dict().items():
        b = q.vae.state_dict()[name]
        assert torch.equal(a, b) != name.startswith(("decoder.", "post_quant_conv.")), name
    assert all(torch.equal(a, q.unet.state_dict()[n]) for n, a in p.unet.state_dict().items())


@torch.no_grad()
def test_bundled_vae_round_trips_the_example_looks():
    """The shipped decoder can draw the style and the subject, so a LoRA's ceiling is not the VAE."""
    import random

    import train_tiny_base as tr
    from diffusers import AutoencoderKL

    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(MODEL, subfolder="vae")
    rng = random.Random(7)
    specs = [shapes.random_spec(rng, pairs=shapes.all_pairs()) for _ in range(32)]
    ims = tr.to_images(tr.round_trip(vae, tr.to_tensor([shapes.render(s, "creature") for s in specs])))
    assert np.mean([shapes.is_styled(im) for im in ims]) >= 0.9
    assert shapes.prompt_following(ims, specs)["bg"] >= 0.9


def test_example_datasets_are_committed_and_deterministic(tmp_path):
    import make_datasets
    from PIL import Image

    make_datasets.make(tmp_path)
    for sub in ["pokemon", "dreambooth/instance"]:
        meta = (EXAMPLES / "data" / sub / "metadata.jsonl").read_text()
        assert meta == (tmp_path / sub / "metadata.jsonl").read_text()
        rows = [json.loads(line) for line in meta.splitlines()]
        for row in rows:
            a = np.asarray(Image.open(EXAMPLES / "data" / sub / row["file_name"]))
            b = np.asarray(Image.open(tmp_path / sub / row["file_name"]))
            assert a.shape == (32, 32, 3) and (a == b).all()
    assert len(list((EXAMPLES / "data" / "pokemon").glob("*.png"))) == 144
    prompts = json.loads((EXAMPLES / "data" / "dreambooth" / "prompts.json").read_text())
    assert prompts["instance_prompt"] == "a sks square" and prompts["class_prompt"] == "a square"
    # captions use only the base model's words
    for line in (EXAMPLES / "data" / "pokemon" / "metadata.jsonl").read_text().splitlines():
        assert set(json.loads(line)["text"].split()) <= set(shapes.VOCAB_WORDS)


def test_decoder_only_refuses_a_folder_it_did_not_write(tmp_path):
    import train_tiny_base as tr

    with pytest.raises(SystemExit, match="--decoder-only .*no model_index.json"):
        tr.main(["--decoder-only", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
