"""SDXL on the inference and tools side: the XL pipeline, LoRAs on its UNet and both text encoders, refusals across
families, kohya's SDXL names (checked by diffusers' own loader), and inspect/convert/resize/merge/extract/fuse."""
import contextlib
import io
import json
import logging
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_formats import assert_same_deltas, rich_lora

from sdlora.cli import main
from sdlora.errors import UserError
from sdlora.lora import formats
from sdlora.lora.formats import Lora, Module
from sdlora.pipeline import (
    COMPONENTS,
    Adapters,
    fuse_loras,
    generate,
    load_adapters,
    load_base,
    load_pipeline,
    sample,
    unfuse_loras,
)
from sdlora.testing import demo_lora

torch.set_num_threads(1)

# (path, rank, alpha) on sdxl-tiny: every kind of layer kohya names differently on SDXL's original UNet (attention
# in the down, mid and up blocks, 2nd transformer layers, resnet convs, shortcut, time projection, down/upsamplers,
# conv_in/out, time and added-conditioning MLPs), and both text encoders (the second one mlp-only).
XL_LAYERS = [
    ("unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", 4, 8.0),
    ("unet.down_blocks.1.attentions.0.proj_in", 2, 2.0),
    ("unet.down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj", 4, 4.0),
    ("unet.down_blocks.0.resnets.1.conv1", 3, 1.5),
    ("unet.down_blocks.1.resnets.0.conv_shortcut", 2, 4.0),
    ("unet.down_blocks.0.downsamplers.0.conv", 2, 2.0),
    ("unet.mid_block.resnets.1.time_emb_proj", 4, 8.0),
    ("unet.mid_block.attentions.0.transformer_blocks.1.attn1.to_q", 4, 8.0),
    ("unet.up_blocks.0.attentions.2.transformer_blocks.1.attn1.to_out.0", 4, 4.0),
    ("unet.up_blocks.0.upsamplers.0.conv", 2, 2.0),
    ("unet.up_blocks.1.resnets.2.conv2", 2, 2.0),
    ("unet.conv_in", 2, 2.0),
    ("unet.conv_out", 2, 2.0),
    ("unet.time_embedding.linear_2", 2, 2.0),
    ("unet.add_embedding.linear_1", 2, 2.0),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 4, 8.0),
    ("text_encoder_2.text_model.encoder.layers.1.mlp.fc1", 2, 2.0),
]

# diffusers path -> kohya module name on the real SDXL UNet, as kohya's sd-scripts name them (it trains SDXL on the
# original UNet; library/sdxl_model_util.make_unet_conversion_map), and ComfyUI's/A1111's text-encoder names.
KOHYA_XL = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k":
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
    "unet.down_blocks.2.attentions.1.proj_in": "lora_unet_input_blocks_8_1_proj_in",
    "unet.down_blocks.0.resnets.1.conv1": "lora_unet_input_blocks_2_0_in_layers_2",
    "unet.down_blocks.1.resnets.0.conv_shortcut": "lora_unet_input_blocks_4_0_skip_connection",
    "unet.down_blocks.1.downsamplers.0.conv": "lora_unet_input_blocks_6_0_op",
    "unet.mid_block.resnets.1.time_emb_proj": "lora_unet_middle_block_2_emb_layers_1",
    "unet.mid_block.attentions.0.transformer_blocks.9.ff.net.2":
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
    "unet.up_blocks.0.resnets.2.conv2": "lora_unet_output_blocks_2_0_out_layers_3",
    "unet.up_blocks.0.upsamplers.0.conv": "lora_unet_output_blocks_2_2_conv",
    "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0":
        "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_out_0",
    "unet.up_blocks.2.resnets.0.conv_shortcut": "lora_unet_output_blocks_6_0_skip_connection",
    "unet.conv_in": "lora_unet_input_blocks_0_0",
    "unet.conv_out": "lora_unet_out_2",
    "unet.time_embedding.linear_1": "lora_unet_time_embed_0",
    "unet.add_embedding.linear_2": "lora_unet_label_emb_0_2",
    "text_encoder.text_model.encoder.layers.0.self_attn.out_proj":
        "lora_te1_text_model_encoder_layers_0_self_attn_out_proj",
    "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj":
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
    "text_encoder_2.text_model.encoder.layers.31.mlp.fc2": "lora_te2_text_model_encoder_layers_31_mlp_fc2",
}
COMFY_TEXT = re.compile(r"lora_te[12]_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])")


@pytest.fixture(scope="module")
def xl_lora(sdxl_model, tmp_path_factory):
    """A random LoRA on the SDXL base's UNet and both text encoders, written as the trainer writes one."""
    pipe = load_base(sdxl_model)
    out = tmp_path_factory.mktemp("xl") / "xl-style"
    demo_lora(out, base=sdxl_model, unet=pipe.unet, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
              strength=1.0)
    return out


def _state(pipe) -> dict:
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}


def _array(images):
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


def test_xl_base_loads_as_an_xl_pipeline_that_stacks_fuses_and_unfuses_loras(xl_lora, sdxl_model):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    plain = load_pipeline([], base=sdxl_model, device="cpu", dtype="fp32")  # exact comparisons below: fp32
    adapters = load_adapters([f"{xl_lora}:0.8"], device="cpu", dtype="fp32")  # the base comes from the LoRA's card
    pipe = adapters.pipe
    assert type(pipe) is StableDiffusionXLPipeline and isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert adapters.base == str(sdxl_model)
    assert pipe.get_list_adapters() == {c: ["xl_style"] for c in COMPONENTS}
    for p in (plain, pipe):
        p.set_progress_bar_config(disable=True)
    images = generate(pipe, "a red square", seed=3, steps=2, num_images=2)
    assert [im.size for im in images] == [(64, 64)] * 2  # the base's own size (16 latents x 4), not 512
    assert np.abs(_array(images) - _array(generate(plain, "a red square", seed=3, steps=2, num_images=2))).max() > 10

    # sample(): the pipeline's encoding, or the caller's (embeddings, pooled) pair, draw the same images
    def encode(texts):
        embeds, _, pooled, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False)
        return embeds, pooled
    negs = ["a blue square", "a green square"]
    own = sample(pipe, ["a red square"] * 2, [3, 4], steps=2, negative_prompts=negs)
    assert np.array_equal(_array(own), _array(sample(pipe, ["a red square"] * 2, [3, 4], steps=2, encode=encode,
                                                     negative_prompts=negs)))

    base = _state(plain)
    originals = fuse_loras(pipe)
    assert np.abs(_array(generate(pipe, "a red square", seed=3, steps=2, num_images=2)) - _array(images)).max() <= 1
    unfuse_loras(pipe, originals)
    pipe.unload_lora_weights()
    after = _state(pipe)
    assert all(torch.equal(base[c][k], after[c][k]) for c in COMPONENTS for k in base[c])


def test_a_lora_for_another_family_is_refused_naming_both(xl_lora, tiny_model, sdxl_model, tmp_path):
    sd1_lora = demo_lora(tmp_path / "sd1", base=tiny_model)
    sd1, xl = "SD 1.x (cross-attention dim 32)", "SDXL (cross-attention dim 64)"
    for base, lora, made_for, found in [(sdxl_model, sd1_lora, sd1, xl), (tiny_model, xl_lora, xl, sd1)]:
        pipe = load_base(base)
        adapters = Adapters(pipe)
        with pytest.raises(UserError) as e:
            adapters.add([(lora, 1.0)])
        msg = str(e.value)
        assert f"LoRA for {made_for} does not fit the base model ({found}): " in msg and "\n" not in msg, msg
        assert not pipe.get_list_adapters() and not adapters.loaded


def test_sdxl_kohya_names_are_kohyas_original_unet_names(tmp_path):
    """The kohya layout of an SDXL LoRA names UNet layers as kohya's sd-scripts do, and reads back unchanged."""
    mods = {}
    for name in KOHYA_XL:
        width = 2048 if name.endswith("attn2.to_k") else 8  # SDXL's cross-attention width: family "SDXL"
        mods[name] = Module(torch.ones(1, width), torch.ones(8, 1), 1.0)
    lora = Lora(mods)
    file = formats.save_lora(lora, tmp_path / "k.safetensors", "kohya")
    assert {k.split(".")[0] for k in load_file(file)} == set(KOHYA_XL.values())
    back = formats.load_lora(file)
    assert sorted(back.modules) == sorted(KOHYA_XL) and formats.family(back) == formats.family(lora) == "SDXL"
    # without a second text encoder the first is still kohya's SDXL lora_te1_ (A1111 reads SDXL's only so)
    no_te2 = Lora({n: m for n, m in mods.items() if not n.startswith("text_encoder_2.")})
    keys = load_file(formats.save_lora(no_te2, tmp_path / "k1.safetensors", "kohya"))
    assert {k.split(".")[0] for k in keys} == {v for n, v in KOHYA_XL.items() if n in no_te2.modules}


@contextlib.contextmanager
def _reports():
    """Everything diffusers/peft/transformers log at warning level, and every Python warning, inside the block."""
    buf, handler = io.StringIO(), logging.StreamHandler()
    handler.setStream(buf)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield lambda: buf.getvalue() + "".join(str(w.message) for w in caught)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def test_sdxl_kohya_file_round_trips_and_draws_the_same_images_in_diffusers(sdxl_model, tmp_path):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_model))  # unmodified diffusers from here on
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    lora = rich_lora(pipe, layers=XL_LAYERS, std=0.3)
    formats.save_lora(lora, tmp_path / "d", "diffusers")
    kohya = tmp_path / "k.safetensors"
    assert main(["convert", str(tmp_path / "d"), str(kohya), "--to", "kohya"]) == 0
    names = {k.split(".")[0] for k in load_file(kohya)}
    unet = {n for n in names if n.startswith("lora_unet_")}
    assert not re.search(r"down_blocks|mid_block|up_blocks", " ".join(unet))  # kohya's original-UNet names only
    assert all(COMFY_TEXT.fullmatch(n) for n in names - unet), names - unet
    assert {n[:9] for n in names - unet} == {"lora_te1_", "lora_te2_"}
    assert_same_deltas(lora, formats.load_lora(kohya), tol=1e-6)

    def draw(source=None):
        with _reports() as reported:
            if source is not None:
                pipe.load_lora_weights(str(source))
        assert reported() == "", reported()  # no missing/unexpected keys, nothing skipped
        images = pipe("a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
        pipe.unload_lora_weights()
        return images
    plain, reference, from_kohya = draw(), draw(tmp_path / "d"), draw(kohya)
    assert np.abs(reference - plain).max() > 1e-2
    assert np.abs(from_kohya - reference).max() <= 1e-5
    assert np.array_equal(draw(), plain)  # unloading restored the base exactly

    bad = {**load_file(kohya), "lora_unet_input_blocks_4_1_nope.lora_down.weight": torch.zeros(1, 64),
           "lora_unet_input_blocks_4_1_nope.lora_up.weight": torch.zeros(64, 1)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with _reports() as reported:  # the check above would see a key diffusers cannot place
        pipe.load_lora_weights(str(tmp_path / "bad.safetensors"))
    assert "unexpected keys" in reported()


def test_lora_tools_on_sdxl_files(xl_lora, tmp_path, capsys):
    original = formats.load_lora(xl_lora)
    assert main(["inspect", str(xl_lora), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["architecture"].startswith("SDXL") and set(d["components"]) == {"unet", "text_encoder", "text_encoder_2"}

    src = xl_lora
    for fmt in ("peft", "kohya", "diffusers"):  # peft keeps each text encoder in its own subfolder
        assert main(["convert", str(src), str(tmp_path / fmt), "--to", fmt]) == 0
        src = tmp_path / fmt
        assert_same_deltas(original, formats.load_lora(src), tol=1e-6)
    assert (tmp_path / "peft" / "text_encoder_2" / "adapter_model.safetensors").is_file()

    assert main(["resize", str(xl_lora), str(tmp_path / "r.safetensors"), "--rank", "2"]) == 0
    small = formats.load_lora(tmp_path / "r.safetensors")
    assert small.modules.keys() == original.modules.keys() and {m.rank for m in small.modules.values()} == {2}

    assert main(["merge", f"{xl_lora}:0.5", f"{tmp_path / 'kohya'}:-2", str(tmp_path / "m.safetensors")]) == 0
    merged = formats.load_lora(tmp_path / "m.safetensors")
    assert merged.modules.keys() == original.modules.keys()
    for name, m in merged.modules.items():
        assert torch.allclose(m.delta(), -1.5 * original.modules[name].delta(), atol=1e-5), name


def test_extract_and_fuse_on_sdxl_bases(xl_lora, sdxl_model, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    tuned = load_base(sdxl_model)
    change = rich_lora(tuned, seed=5, layers=[(n, 2, 2.0) for n, _, _ in XL_LAYERS])
    for name, m in change.modules.items():
        comp, path = name.split(".", 1)
        getattr(tuned, comp).get_submodule(formats.live_path(comp, path)).weight.data += m.delta()
    tuned.save_pretrained(str(tmp_path / "tuned"))
    out = tmp_path / "x.safetensors"
    argv = ["extract", "--base", str(sdxl_model), "--tuned", str(tmp_path / "tuned"), "--rank", "2", str(out)]
    assert main(argv) == 0
    assert_same_deltas(change, formats.load_lora(out), tol=1e-5)  # text_encoder_2's layer included

    assert main(["fuse", "--lora", f"{xl_lora}:0.8", "--out", str(tmp_path / "fused")]) == 0
    fused = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "fused"))
    reference = load_pipeline([f"{xl_lora}:0.8"], scheduler="keep", device="cpu", dtype="fp32")  # exactness: fp32

    def draw(p):
        return p("a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert np.abs(draw(fused) - draw(reference)).max() <= 1e-4
    assert not any("lora" in k for c in COMPONENTS for k in getattr(fused, c).state_dict())

    assert main(["generate", "a red square", "--lora", str(xl_lora), "--steps", "2", "--seed", "7",
                 "--out", str(tmp_path / "imgs")]) == 0
    png = Image.open(tmp_path / "imgs" / "00000-7.png")
    assert png.size == (64, 64) and json.loads(png.text["sdlora"])["base"] == str(sdxl_model)


def test_model_card_snippet_loads_an_sdxl_base_with_the_xl_pipeline():
    from sdlora.output.modelcard import render

    info = {"base_model": "stabilityai/stable-diffusion-xl-base-1.0", "rank": 4, "alpha": 4, "steps": 1,
            "learning_rate": 1e-4, "resolution": 1024, "target_modules": ["to_q"]}
    assert "pipe = StableDiffusionXLPipeline.from_pretrained(" in render({**info, "family": "SDXL"})
    assert "pipe = StableDiffusionPipeline.from_pretrained(" in render({**info, "family": "SD 1.x"})
