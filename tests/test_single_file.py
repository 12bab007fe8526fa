"""Single-file base checkpoints (the original layout community finetunes ship in): written by sdlora's own
converter, read back through diffusers' single-file loading, trained on exactly as the diffusers folder they came
from, drawn from, detected (family, v-prediction marker), named by hash, and refused one line at a time.

Time: each (family, recipe) pair is trained once per module (`runs`), in-process, at 2 steps and 32 px; one file
run goes through the script as a subprocess (the SD 2.x text-to-image one, whose log the v-pred test reads)."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_images
from helpers import T2I, fast_flags, read_lora, recipe_error, run

from sdlora.bases import detect, ldm, load
from sdlora.cli.run import run as run_recipe
from sdlora.recipes import dreambooth as db
from sdlora.recipes import text_to_image as t2i

torch.set_num_threads(1)
BASES = {"sd1": "sdlora-tiny", "sdxl": "sdlora-tiny-xl"}
RECIPES = {"t2i": t2i, "dreambooth": db}


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd2_model):
    """{family: (single file, the folder it was written from)}; SD 2.x's file carries ComfyUI's v_pred marker."""
    d = tmp_path_factory.mktemp("single")
    out = {f: (ldm.write(b, d / f"{f}.safetensors")[0], b) for f, b in BASES.items()}
    out["sd2"] = (ldm.write(sd2_model, d / "sd2.safetensors", markers=("v_pred",))[0], str(sd2_model))
    return out


@pytest.fixture(scope="module")
def eps_configs(files, tmp_path_factory):
    """The SD 2.x folder's configs and tokenizers with an epsilon scheduler: trained with these, the SD 2.x file's
    v_pred marker alone makes it a v-prediction run."""
    configs = tmp_path_factory.mktemp("eps") / "configs"
    shutil.copytree(files["sd2"][1], configs, ignore=shutil.ignore_patterns("*.safetensors"))
    sched = configs / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "epsilon"}))
    return configs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "d", n=2)


def _argv(recipe, base, out, data, *extra, **over):
    argv = fast_flags(base, out, max_train_steps=2, **over) + [str(x) for x in extra]
    return argv + (["--train_data_dir", str(data)] if recipe == "t2i" else
                   ["--instance_data_dir", str(data), "--instance_prompt", "a sks square"])


def _train(recipe, base, out, data, *extra, **over):
    """A run in this process (the recipe's own parse_args and run, as the script does)."""
    mod = RECIPES[recipe]
    assert run_recipe(mod.parse_args(_argv(recipe, base, out, data, *extra, **over)), mod.make_recipe) == 0


@pytest.fixture(scope="module")
def runs(files, eps_configs, data, tmp_path_factory):
    """{(family, recipe): output folder trained from the single file}, trained once (learning rate 0.05, so two
    steps move every LoRA weight); the folder-trained twin beside it as <name>-folder. The SD 2.x file trains with
    epsilon configs (its marker decides), and its text-to-image run is the script's, as a subprocess (`logs`)."""
    done, logs = {}, {}

    def trained(family, recipe):
        if (family, recipe) not in done:
            path, folder = files[family]
            out = tmp_path_factory.mktemp("runs") / "file"
            configs = eps_configs if family == "sd2" else folder
            if (family, recipe) == ("sd2", "t2i"):
                logs[family, recipe] = run(T2I, _argv(recipe, path, out, data, "--base_config", configs,
                                                      learning_rate=0.05)).stderr
            else:
                _train(recipe, path, out, data, "--base_config", configs, learning_rate=0.05)
            _train(recipe, folder, out.with_name("folder"), data, learning_rate=0.05)
            done[family, recipe] = out
        return done[family, recipe]
    trained.logs = logs
    return trained


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_written_file_loads_through_diffusers_as_the_folders_weights(files, family):
    """Own converter (diffusers -> original names) read back by diffusers' from_single_file: every weight equal."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdlora import models

    path, folder = files[family]
    folder = models.resolve_base(folder)
    ckpt = detect.read(path)
    assert ckpt.family == family and load.resolve_configs(ckpt, folder) == folder
    parts = [("unet", UNet2DConditionModel), ("vae", AutoencoderKL)] + \
        [(n, getattr(transformers, models.TEXT_CLASSES[n])) for n in ldm.TEXT[family]]
    for part, cls in parts:
        got = load.component(cls, path, part, folder, torch.float32).state_dict()
        want = cls.from_pretrained(folder, subfolder=part).state_dict()
        assert got.keys() == want.keys(), part
        assert all(torch.equal(got[k], want[k]) for k in got), part


@pytest.mark.parametrize("family,recipe", [(f, r) for f in ("sd1", "sd2", "sdxl") for r in RECIPES])
def test_a_single_file_trains_the_same_lora_as_its_folder(files, runs, family, recipe):
    path, _ = files[family]
    tmp_path = runs(family, recipe).parent
    a, meta = read_lora(tmp_path / "file" / "pytorch_lora_weights.safetensors")
    b, _ = read_lora(tmp_path / "folder" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert all(v.abs().max() > 0 for k, v in a.items() if k.endswith(".up.weight"))  # it trained
    _, kohya = read_lora(tmp_path / "file" / "file.safetensors")
    # named and hashed as kohya/A1111 name a base: the file's name (never its path) and its hashes
    assert kohya["ss_sd_model_name"] == path.name and meta["ss_sd_model_name"] == path.name
    assert kohya["ss_new_sd_model_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "rb") as f:
        f.seek(0x100000)
        assert kohya["ss_sd_model_hash"] == hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    assert str(path.parent) not in (tmp_path / "file" / "README.md").read_text()
    # the SD 2.x file, trained with epsilon configs, is a v-prediction run by its marker: the v-prediction folder's LoRA
    assert (meta["modelspec.prediction_type"] == "v") == (family == "sd2")


def test_a_pickle_checkpoint_loads_only_with_the_opt_in(files, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from sdlora import models

    path, folder = files["sd1"]
    folder = models.resolve_base(folder)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path))}, str(ckpt))
    assert detect.read(ckpt, allow_pickle=True).family == "sd1"
    got = load.component(UNet2DConditionModel, ckpt, "unet", folder, torch.float32, allow_pickle=True).state_dict()
    want = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # --quantize_base over a single file: tests/test_quantize.py (CI's bitsandbytes step)


def test_a_v_pred_marked_file_trains_on_the_velocity_with_no_flag(runs):
    """The SD 2.x file is marked with ComfyUI's v_pred key and trained (by the script, as a subprocess) with
    --base_config configs whose scheduler says epsilon: the marker decides, and the log says so. (That its LoRA is
    the one the v-prediction SD 2.x folder trains: test_a_single_file_trains_the_same_lora_as_its_folder[sd2-t2i].)"""
    out = runs("sd2", "t2i")
    err = runs.logs["sd2", "t2i"]
    assert "SD 2.x (v-prediction)" in err and "its v_pred key" in err, err[-2000:]
    assert read_lora(out / "file.safetensors")[1]["modelspec.prediction_type"] == "v"


def test_generate_from_the_file_draws_the_folders_image(files):
    from sdlora.pipeline import load_pipeline, sample

    path, folder = files["sd1"]
    a = sample(load_pipeline(base=str(path), base_config=folder, device="cpu", dtype="fp32"), ["a red square"],
               seeds=[3], steps=4, width=32, height=32)[0]
    b = sample(load_pipeline(base=folder, device="cpu", dtype="fp32"), ["a red square"], seeds=[3], steps=4,
               width=32, height=32)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_convert_base_writes_a_single_file_as_a_folder_that_draws_what_generate_draws_from_the_file(files,
                                                                                                   eps_configs,
                                                                                                   tmp_path):
    """`sdlora convert-base FILE DIR --base_config CONFIGS`: a diffusers folder an unmodified StableDiffusionPipeline
    loads (from_pretrained, with the DPM++ sampler sdlora generate uses) and draws the very image `sdlora generate
    --base FILE` draws; the SD 2.x file's v_pred marker becomes the folder's scheduler's prediction type."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from PIL import Image

    from sdlora.cli import main

    path, folder = files["sd1"]
    out = tmp_path / "converted"
    assert main(["convert-base", str(path), str(out), "--base_config", folder]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red square", num_inference_steps=3, guidance_scale=7.5, width=32, height=32,
                  generator=[torch.Generator("cpu").manual_seed(3)]).images[0]
    assert main(["generate", "--base", str(path), "--base_config", folder, "a red square", "--seed", "3", "--steps",
                 "3", "--guidance", "7.5", "--width", "32", "--height", "32", "--dtype", "fp32", "--out",
                 str(tmp_path / "drawn")]) == 0
    ours = Image.open(next((tmp_path / "drawn").glob("*.png")))
    assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(theirs))
    # nothing written over: an existing folder needs --overwrite; --base_config beside a folder input is one line
    assert main(["convert-base", str(path), str(out), "--base_config", folder]) == 2
    assert main(["convert-base", folder, str(tmp_path / "x.safetensors"), "--base_config", folder]) == 2
    assert not (tmp_path / "x.safetensors").exists()
    # and back: the folder written as a file again is the file it came from, tensor for tensor
    from safetensors.torch import load_file

    assert main(["convert-base", str(out), str(tmp_path / "back.safetensors")]) == 0
    a, b = load_file(str(tmp_path / "back.safetensors")), load_file(str(path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sd2, _ = files["sd2"]
    assert main(["convert-base", str(sd2), str(tmp_path / "sd2"), "--base_config", str(eps_configs)]) == 0
    sched = json.loads((tmp_path / "sd2" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"  # the file's v_pred key, over the configs' epsilon


def test_an_unmodified_diffusers_pipeline_loads_the_file_and_the_lora(files, runs):
    """Held-out loader: diffusers' own StableDiffusionPipeline.from_single_file, then the LoRA a file-based run wrote."""
    from diffusers import StableDiffusionPipeline

    from sdlora import models

    path, folder = files["sd1"]
    out = runs("sd1", "t2i")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=models.resolve_base(folder),
                                                    local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        return pipe("a red square", num_inference_steps=2, width=32, height=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    before = draw()
    pipe.load_lora_weights(str(out))
    assert pipe.get_active_adapters() and not np.allclose(before, draw())


def test_extract_from_single_files_is_the_lora_their_folders_give(files, tmp_path):
    """`sdlora extract` with a single-file base and tuned model (one --base_config for both) writes the very LoRA
    the two diffusers folders give."""
    from diffusers import StableDiffusionPipeline

    from sdlora import models
    from sdlora.cli import main

    path, folder = files["sd1"]
    pipe, tuned = StableDiffusionPipeline.from_pretrained(models.resolve_base(folder)), tmp_path / "tuned"
    torch.manual_seed(1)
    for model in (pipe.unet, pipe.text_encoder):  # the same model, its query projections changed
        for name, p in model.named_parameters():
            if name.endswith(("to_q.weight", "q_proj.weight")):
                p.data += 0.05 * torch.randn_like(p)
    pipe.save_pretrained(str(tuned))
    tuned_file, _ = ldm.write(tuned, tmp_path / "tuned.safetensors")
    assert main(["extract", "--base", str(path), "--tuned", str(tuned_file), "--base_config", folder, "--rank", "2",
                 str(tmp_path / "file.safetensors")]) == 0
    assert main(["extract", "--base", models.resolve_base(folder), "--tuned", str(tuned), "--rank", "2",
                 str(tmp_path / "folder.safetensors")]) == 0
    a, b = (read_lora(tmp_path / f"{n}.safetensors")[0] for n in ("file", "folder"))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert main(["extract", "--base", folder, "--tuned", str(tuned), "--base_config", folder, "--rank", "2",
                 str(tmp_path / "no.safetensors")]) == 2  # --base_config beside two folders: one line
    assert not (tmp_path / "no.safetensors").exists()


def test_fuse_onto_a_single_file_writes_the_folders_fused_pipeline(files, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdlora import models
    from sdlora.cli import main
    from sdlora.testing import demo_lora

    path, folder = files["sd1"]
    lora = demo_lora(tmp_path / "lora", base=models.resolve_base(folder))
    assert main(["fuse", "--base", str(path), "--base_config", folder, "--lora", f"{lora}:0.8",
                 "--out", str(tmp_path / "file")]) == 0
    assert main(["fuse", "--base", folder, "--lora", f"{lora}:0.8", "--out", str(tmp_path / "folder")]) == 0
    a, b, base = (StableDiffusionPipeline.from_pretrained(str(d)) for d in (tmp_path / "file", tmp_path / "folder",
                                                                            models.resolve_base(folder)))
    for part in ("unet", "text_encoder", "vae"):
        got, want = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), part
    plain = base.unet.state_dict()
    assert any(not torch.equal(v, plain[k]) for k, v in a.unet.state_dict().items())  # the LoRA is in it


# ---------------------------------------------------------------- from the Hub (only huggingface_hub's downloads stubbed)

@pytest.fixture
def hub(files, tmp_path, monkeypatch):
    """huggingface_hub's hf_hub_download and snapshot_download (the two sdlora calls) served from local files: the
    SD 1.x file as someone/finetune/sd1.safetensors, and any repo's configs and tokenizers as the tiny folder's
    (only the files the allow_patterns ask for). Calls are recorded in `asked`; a kind ("file", "configs") in
    `down` fails as huggingface_hub does without a network."""
    import fnmatch
    from pathlib import Path

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from sdlora import models

    path, folder = files["sd1"]
    state = {"asked": [], "down": set()}

    def hf_hub_download(repo_id, filename, revision=None, **kw):
        state["asked"].append(("file", repo_id, filename, revision))
        if "file" in state["down"] or (repo_id, filename) != ("someone/finetune", path.name):
            raise LocalEntryNotFoundError("stub: no network")
        return str(path)

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        state["asked"].append(("configs", repo_id, tuple(allow_patterns or ())))
        if "configs" in state["down"]:
            raise LocalEntryNotFoundError("stub: no network")
        snap = tmp_path / "snapshot" / repo_id
        shutil.copytree(models.resolve_base(folder), snap, dirs_exist_ok=True, ignore=lambda d, names: [
            n for n in names if not Path(d, n).is_dir() and not any(fnmatch.fnmatch(n, p) for p in allow_patterns)])
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return state


def test_a_hub_file_trains_with_the_configs_diffusers_picks_for_it(files, runs, data, hub, tmp_path):
    """`owner/repo/file.safetensors` with no --base_config: the file comes through hf_hub_download, the configs
    and tokenizers (JSON and text files only) of the repo diffusers' fetch_diffusers_config picks through
    snapshot_download, and the LoRA is the one the local file with --base_config trains; its resolve URL loads the
    same pipeline for drawing."""
    from sdlora.pipeline import load_pipeline, sample

    path, folder = files["sd1"]
    _train("t2i", f"someone/finetune/{path.name}", tmp_path / "o", data, learning_rate=0.05)
    assert hub["asked"] == [("file", "someone/finetune", path.name, None),
                            ("configs", "stable-diffusion-v1-5/stable-diffusion-v1-5", ("*.json", "*.txt"))]
    a, meta = read_lora(tmp_path / "o" / "pytorch_lora_weights.safetensors")
    b, _ = read_lora(runs("sd1", "t2i") / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert meta["ss_sd_model_name"] == path.name
    url = f"https://huggingface.co/someone/finetune/resolve/main/{path.name}"
    drawn = [sample(load_pipeline(base=base, base_config=configs, device="cpu", dtype="fp32"), ["a red square"],
                    seeds=[3], steps=2, width=32, height=32)[0] for base, configs in ((url, None), (path, folder))]
    assert hub["asked"][-2][3] == "main"  # the URL's revision
    assert np.array_equal(np.asarray(drawn[0]), np.asarray(drawn[1]))


@pytest.mark.parametrize("down,expect", [
    ("configs", "the Hub (stable-diffusion-v1-5/stable-diffusion-v1-5) is unreachable; pass --base_config DIR_OR_ID"),
    ("file", "not a local file, and the Hub did not give it")])
def test_a_hub_file_offline_is_one_line(files, hub, tmp_path, capsys, no_model_loads, down, expect):
    """No network: the Hub file, or (the file cached) its configs, cannot be had; one line, before any weights."""
    hub["down"].add(down)
    name = f"someone/finetune/{down}-offline/{files['sd1'][0].name}" if down == "file" else \
        f"someone/finetune/{files['sd1'][0].name}"
    msg = recipe_error(capsys, t2i, fast_flags(name, tmp_path / "o", train_data_dir=tmp_path))
    assert expect in msg, msg


def _bad(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    return p


@pytest.mark.parametrize("case,expect", [
    ("not", "not a checkpoint"), ("lora", "this is a LoRA"), ("truncated", "truncated"),
    ("unknown", "unknown architecture"), ("sd3", "an SD3 / 3.5 single-file checkpoint; sdlora reads SD3 bases as "
                                                "diffusers folders"),
    ("pickle", "--allow_pickle"), ("offline", "--base_config DIR_OR_ID"),
    ("wrong_family", "SDXL checkpoint"), ("clip_skip_xl", "--clip_skip is not used with an SDXL base")])
def test_bad_single_files_are_one_line_before_any_weights_load(files, tmp_path, capsys, no_model_loads, case,
                                                                expect):
    from safetensors.torch import save_file

    sd1, folder = files["sd1"]
    base_config = [] if case == "offline" else ["--base_config", "sdlora-tiny"]
    if case == "not":
        base = _bad(tmp_path, "x.safetensors", b"this is a text file, not weights")
    elif case == "lora":
        base = tmp_path / "lora.safetensors"
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(base))
    elif case == "truncated":
        base = _bad(tmp_path, "cut.safetensors", sd1.read_bytes()[:-1000])
    elif case == "unknown":
        base = tmp_path / "flux.safetensors"
        save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(4)}, str(base))
    elif case == "sd3":  # SAI's SD3 file layout: the MMDiT under model.diffusion_model.joint_blocks…
        base = tmp_path / "sd3.5_medium.safetensors"
        save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2),
                   "model.diffusion_model.x_embedder.proj.weight": torch.zeros(2, 16, 2, 2)}, str(base))
    elif case == "pickle":
        base = tmp_path / "model.ckpt"
        torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)}}, str(base))
    elif case == "wrong_family":
        base = files["sdxl"][0]
    elif case == "clip_skip_xl":
        base, base_config = files["sdxl"][0], ["--base_config", "sdlora-tiny-xl", "--clip_skip", "2"]
    else:
        base = sd1
    msg = recipe_error(capsys, t2i, fast_flags(base, tmp_path / "o", train_data_dir=tmp_path) + base_config)
    assert expect in msg, msg


# ---------------------------------------------------------------- clip skip (kohya/A1111's meaning)

def test_clip_skip_2_is_diffusers_clip_skip_1_and_changes_the_conditioning():
    from diffusers import StableDiffusionPipeline

    from sdlora import models

    pipe = StableDiffusionPipeline.from_pretrained(models.resolve_base("sdlora-tiny"), safety_checker=None)
    prompt = ["a red square on a blue background"]
    ours = models.encode_prompts(pipe.text_encoder, pipe.tokenizer, prompt, clip_skip=2)
    # diffusers 0.42's clip_skip path reads text_encoder.text_model.final_layer_norm, which transformers >= 5.6's
    # flattened CLIPTextModel no longer has: give it that name (outside the module tree) to run its code unchanged
    object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
    with torch.no_grad():
        theirs = pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=1)[0]
    last = models.encode_prompts(pipe.text_encoder, pipe.tokenizer, prompt)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.allclose(ours, last)
    torch.testing.assert_close(models.encode_prompts(pipe.text_encoder, pipe.tokenizer, prompt, clip_skip=1), last)
    from sdlora.pipeline import generate

    pipe.set_progress_bar_config(disable=True)
    at = {n: np.asarray(generate(pipe, prompt[0], steps=2, width=32, height=32, clip_skip=n)[0]) for n in (1, 2)}
    assert not np.array_equal(at[1], at[2])


def test_clip_skip_trains_differently_is_recorded_and_generate_applies_it(files, runs, data, tmp_path):
    from sdlora.pipeline import load_adapters

    _, folder = files["sd1"]
    out = tmp_path / "skip"
    _train("t2i", folder, out, data, "--clip_skip", "2", learning_rate=0.05)
    a, meta = read_lora(out / "pytorch_lora_weights.safetensors")
    b, _ = read_lora(runs("sd1", "t2i").with_name("folder") / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the same run at clip skip 1
    assert meta["ss_clip_skip"] == "2" and read_lora(out / "skip.safetensors")[1]["ss_clip_skip"] == "2"
    assert "| clip skip | 2 |" in (out / "README.md").read_text()
    assert load_adapters([str(out)], base=folder, device="cpu", dtype="fp32").clip_skip == 2
