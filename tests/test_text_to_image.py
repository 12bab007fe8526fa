"""End-to-end: the text-to-image script on a real tiny pipeline, loaded back by plain diffusers."""
import json
import re
import logging

import numpy as np
import pytest
import torch
from conftest import make_images
from helpers import T2I, fast_flags, front_matter, read_lora, run

from sdlora.lora import formats
from sdlora.output.weights import kohya_name


def _generate(pipe, prompt="a red square on a blue background"):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=4, generator=g, height=32, width=32, output_type="np").images


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One real training run shared by the output-format tests."""
    tmp = tmp_path_factory.mktemp("t2i")
    data = make_images(tmp / "data", n=6)
    out = tmp / "out"
    r = run(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=6, checkpointing_steps=2,
                            checkpoints_total_limit=2, validation_prompt="a red square", num_validation_images=1,
                            report_to="tensorboard", lora_alpha=8))
    return out, r


def test_outputs_load_in_unmodified_diffusers(trained, tiny_model, caplog):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    out, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    before = _generate(pipe)
    w0 = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(out))
    assert not [r for r in caplog.records if "unexpected key" in r.getMessage().lower()
                or "missing key" in r.getMessage().lower()], caplog.text
    # Every tensor in the file was applied: each saved up/down pair maps to a live peft layer.
    sd, _ = read_lora(out / "pytorch_lora_weights.safetensors")
    n_layers = sum(1 for k in sd if k.endswith("lora.down.weight"))
    lora_layers = [m for m in pipe.unet.modules() if hasattr(m, "lora_A") and "default_0" in getattr(m, "lora_A", {})]
    assert n_layers == len(lora_layers) > 0
    after = _generate(pipe)
    assert np.abs(after - before).max() > 1e-4, "LoRA did not change the images"
    # alpha=8, rank=4: the file carries scale alpha/r = 2 folded into its up weights (so ComfyUI, which reads no
    # alpha from it, applies it too); diffusers applies exactly the kohya file's up @ down * alpha / r.
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert attn.scaling["default_0"] == pytest.approx(1.0)
    kohya, _ = read_lora(out / kohya_name(out))  # the folder is named "out": <its parent>-out.safetensors
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    want = kohya[k + ".lora_up.weight"] @ kohya[k + ".lora_down.weight"] * kohya[k + ".alpha"] / 4
    assert float(kohya[k + ".alpha"]) == 8 and torch.allclose(attn.get_delta_weight("default_0"), want, atol=1e-6)
    pipe.unload_lora_weights()
    assert torch.equal(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight, w0)
    assert np.array_equal(_generate(pipe), before), "unload_lora_weights did not restore the base images"


def test_file_format_and_metadata(trained, tiny_model):
    out, r = trained
    # the end of the run says which loader applies which file whole (sdlora inspect's table, one line per file)
    assert ("pytorch_lora_weights.safetensors: read whole, at its scale, by diffusers, ComfyUI, Forge; partially or "
            "rescaled by A1111 (none of 32 layers), kohya (none of 32 layers)") in r.stderr
    assert f"{kohya_name(out)}: read whole, at its scale, by diffusers, ComfyUI, Forge, A1111, kohya" in r.stderr
    sd, meta = read_lora(out / "pytorch_lora_weights.safetensors")
    # diffusers' attention-processor names, which ComfyUI's loader also maps (formats.to_shared)
    assert all(re.fullmatch(r"unet\..+\.processor\.to_(q|k|v|out)_lora\.(down|up)\.weight", k) for k in sd), sorted(sd)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert meta["ss_sd_model_name"] == str(tiny_model)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["ss_steps"] == "6" and meta["ss_resolution"] == "(32, 32)" and meta["ss_learning_rate"] == "0.001"
    assert "data" in meta["ss_dataset_dirs"] and meta["sdlora_version"]
    assert meta["sdlora_target_modules"] == "to_q,to_k,to_v,to_out.0"
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 4  # = rank: alpha 8 is in the weights


def test_model_card(trained, tiny_model):
    out, _ = trained
    fm = front_matter(out / "README.md")
    assert fm["base_model"] == str(tiny_model) and fm["library_name"] == "diffusers"
    assert fm["license"] == "creativeml-openrail-m"  # an SD 1.x base whose folder has no card of its own
    text = (out / "README.md").read_text()
    for tag in ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "lora"]:
        assert f"- {tag}\n" in text
    assert "load_lora_weights" in text and "samples/latest_0.png" in text
    assert (out / "samples" / "latest_0.png").exists()


def test_checkpoints_logs_and_progress(trained):
    out, r = trained
    # checkpoints at 2, 4, 6; --checkpoints_total_limit 2 keeps the newest two
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert list((out / "logs").rglob("events.out.tfevents*")), "no tensorboard event file"
    assert "cached VAE latents of 6 images and text embeddings of 6 captions" in r.stderr
    assert "loss=" in r.stderr and "lr=" in r.stderr and ("it/s" in r.stderr or "s/it" in r.stderr)
    assert not list(out.rglob("*.sdlora-tmp")), "temp files left behind"


def test_checkpoints_total_limit_prunes(tiny_model, tmp_path):
    data = make_images(tmp_path / "d", n=2)
    out = tmp_path / "o"
    run(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=7, checkpointing_steps=1,
                        checkpoints_total_limit=3))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6", "checkpoint-7"]


@pytest.mark.parametrize("variant", [{}, {"init_lora_weights": "pissa"},  # (rsLoRA rides along with DoRA: one run less)
                                     {"lora_type": "dora", "target_modules": "to_q,to_v,conv1", "use_rslora": True,
                                      "rank": 8},
                                     {"lora_type": "loha", "target_modules": "to_q,to_v,conv1", "lora_alpha": 2},
                                     {"lora_type": "lokr", "target_modules": "to_q,to_v,conv1", "lora_alpha": 2},
                                     {"lora_type": "adalora", "target_modules": "to_q,to_v,conv1", "rank": 2,
                                      "adalora_init_r": 4, "adalora_tinit": 1, "adalora_tfinal": 2}],
                         ids=["lora", "pissa", "dora-rslora", "loha", "lokr", "adalora"])
def test_resume_is_exact(tiny_model, tmp_path, variant):
    """2N steps in one run == the same run resumed from its checkpoint at step N (fp32, CPU, fixed seed)."""
    data = make_images(tmp_path / "d", n=5)  # 5 rows, batch 2: epochs wrap mid-run
    common = dict(train_data_dir=data, noise_offset=0.05, snr_gamma=5.0, gradient_accumulation_steps=2, **variant)
    # One 6-step run that checkpoints at step 3 (as if killed after it), then the same run resumed from there.
    part = tmp_path / "part"
    whole = run(T2I, fast_flags(tiny_model, part, max_train_steps=6, checkpointing_steps=3, **common))
    assert (part / "checkpoint-3").exists()
    full, _ = read_lora(part / "pytorch_lora_weights.safetensors")
    run(T2I, fast_flags(tiny_model, part, max_train_steps=6, resume_from_checkpoint="checkpoint-3", **common))
    resumed, _ = read_lora(part / "pytorch_lora_weights.safetensors")
    assert full.keys() == resumed.keys()
    diff = max((full[k] - resumed[k]).abs().max().item() for k in full)
    assert diff <= 1e-6, diff
    assert max(v.abs().max().item() for k, v in full.items() if re.search(r"up|lora_B|w2_b|lokr_w2", k)) > 0  # trained
    if "init_lora_weights" in variant:  # saved as the change from the unmodified base: twice the rank
        assert {v.shape[0] for k, v in full.items() if "lora_A" in k or "lora.down" in k} == {8}
        assert "| LoRA init | pissa: saved as the change from the unmodified base" in (part / "README.md").read_text()
    if variant.get("lora_type") == "adalora":  # the budget shrinks (logged), the file holds the final ranks
        logged = re.findall(r"AdaLoRA step \d+: (\d+) of (\d+) ranks active", whole.stderr)
        active, total = [int(a) for a, _ in logged], 24 * 4  # 24 layers (to_q, to_v, conv1) x --adalora_init_r 4
        assert len(active) >= 3 and active[0] == total and active[-1] == total // 2, whole.stderr[-3000:]
        assert active == sorted(active, reverse=True) and "(final ranks from here on)" in whole.stderr
        ranks = [v.shape[0] for k, v in full.items() if k.endswith("lora.down.weight")]
        assert sum(ranks) == total // 2 and len(set(ranks)) > 1  # an average of --rank 2, spread unevenly
        assert "AdaLoRA: saved" in whole.stderr and "layers at their final ranks" in whole.stderr
    elif variant.get("lora_type") in ("loha", "lokr"):  # LyCORIS's factors and network name in the kohya file
        kohya, meta = read_lora(part / "part.safetensors")
        assert any(".hada_w1_a" in k or ".lokr_w1" in k for k in kohya) and meta["ss_network_module"] == "lycoris.kohya"
        assert "load_pipeline" in (part / "README.md").read_text()  # not diffusers' loader, which can't read them
    elif "lora_type" in variant:  # DoRA: magnitudes in both files, LyCORIS's name in the kohya one's header
        assert any(k.endswith("lora_magnitude_vector") for k in full)
        kohya, meta = read_lora(part / "part.safetensors")
        assert any(k.endswith(".dora_scale") for k in kohya) and meta["ss_network_module"] == "lycoris.kohya"
    if "use_rslora" in variant:  # the files carry alpha * sqrt(rank), the card says why
        kohya, meta = read_lora(part / "part.safetensors")
        alphas = [v.item() for k, v in kohya.items() if k.endswith(".alpha")]
        assert alphas and alphas == pytest.approx([8 * 8 ** 0.5] * len(alphas))
        assert json.loads(meta["ss_network_alpha"]) == pytest.approx(8 * 8 ** 0.5)
        assert "| rsLoRA | yes: scale alpha/sqrt(rank), recorded as alpha 22.6274 |" in (part / "README.md").read_text()


def test_targets_beyond_attention_load_whole(tiny_model, tmp_path):
    """ff / proj_in / proj_out targets: every saved layer is applied by plain diffusers."""
    from diffusers import StableDiffusionPipeline

    data = make_images(tmp_path / "d", n=2)
    out = tmp_path / "o"
    run(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=2,
                        target_modules="to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.2"))
    saved_layers = set(formats.load_lora(out / "pytorch_lora_weights.safetensors").modules)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(str(out))
    applied = {f"unet.{n}" for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert saved_layers == applied and any("proj_in" in k for k in applied) and any("ff.net.2" in k for k in applied)
