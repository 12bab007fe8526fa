"""The training package's parts in-process, on the bundled tiny model at 32 px: the set-up stages, one optimizer
step, and the resume check (the end-to-end runs are in test_training.py and friends)."""
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_images
from helpers import fast_flags

from sdlora.cli.flags import train_config
from sdlora.errors import UserError
from sdlora.recipes import text_to_image as t2i
from sdlora.training import frozen, resume, setup, step, trainable
from sdlora.training.hooks import Hooks

MODEL = "sdlora-tiny"


def _config(tmp_path, **over):
    data = make_images(tmp_path / "d", n=4)
    args = t2i.parse_args(fast_flags(MODEL, tmp_path / "out", train_data_dir=data, **over))
    config = train_config(args)
    return config, t2i.make_recipe(args, config)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config, recipe = _config(tmp_path_factory.mktemp("units"))
    seen = {}
    built = setup.setup(config, recipe, Hooks(on_trainable=lambda parts: seen.update(parts)))
    assert seen.keys() == built.parts.keys() == {"unet"}  # the hook saw the trainable set the run trains
    return built


def test_setup_stages(tmp_path):
    config, recipe = _config(tmp_path)
    accelerator, weight_dtype = setup.make_accelerator(config)
    assert weight_dtype == torch.float32  # CPU, no mixed precision
    plan = setup.plan_run(config, recipe, accelerator)
    assert (plan.seed, plan.step, plan.max_steps, plan.lr) == (0, 0, 4, config.learning_rate)
    assert plan.ckpt is None and plan.settings["rank"] == config.rank and "zero_terminal_snr" not in plan.settings
    models = frozen.load(config, accelerator.device, weight_dtype, main=True)
    assert list(models.text_encoders) == ["text_encoder"] and len(models.tokenizers) == 1
    assert not any(p.requires_grad for te in models.text_encoders.values() for p in te.parameters())
    caches, held = setup.build_caches(config, recipe, accelerator, models, plan.seed)
    assert held is None and len(caches) == 4 and caches.embeds is not None
    assert models.latents_cached and models.text_cached and models.vae is None  # released on CPU after caching
    assert models.text_encoders == {"text_encoder": None}
    unet = setup.load_unet(config, accelerator, weight_dtype)
    built = trainable.build(config, accelerator, unet, models.text_encoders, plan.lr, plan.max_steps)
    params = built.parts["unet"].params
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert [g["params"] for g in built.optimizer.param_groups] == [params]
    assert setup.resume_state(plan, built, accelerator) is None  # a new run: nothing to resume


def test_one_step_trains_the_lora_and_only_the_lora(run):
    lora = {n: p.detach().clone() for n, p in run.parts["unet"].bare.named_parameters() if p.requires_grad}
    frozen_weights = {n: p.detach().clone() for n, p in run.parts["unet"].bare.named_parameters()
                      if not p.requires_grad}
    assert lora and frozen_weights
    logs = step.optimizer_step(run)
    step.check_finite(run, logs)
    assert run.step == 1 and torch.isfinite(torch.tensor(logs["loss"])) and logs["lr"] > 0
    after = dict(run.parts["unet"].bare.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in lora.items())
    assert all(torch.equal(after[n], v) for n, v in frozen_weights.items())


def test_resume_check(tmp_path):
    config, recipe = _config(tmp_path)
    settings = resume.settings(config, recipe, 1, 4, config.learning_rate)
    saved = json.loads(json.dumps(settings))  # as state.json holds them
    ckpt = SimpleNamespace(settings=saved, seed=0, path="out/checkpoint-2")
    resume.check(config, ckpt, settings, main=True)  # the same run: accepted
    # an optional setting at its default is accepted whether the checkpoint recorded it or not
    resume.check(config, SimpleNamespace(**{**vars(ckpt), "settings": {**saved, "zero_terminal_snr": False}}),
                 settings, main=True)
    changed, _ = _config(tmp_path / "r8", rank=8)
    with pytest.raises(UserError) as e:
        resume.check(changed, ckpt, resume.settings(changed, recipe, 1, 4, changed.learning_rate), main=True)
    assert "rank 4 -> 8" in str(e.value) and "\n" not in str(e.value)


def test_card_licence_is_the_bases(tmp_path):
    """A LoRA is a derivative of its base: its card carries the base's licence (docs/license.md)."""
    from sdlora.training.summary import base_license

    assert base_license("sdlora-tiny", None, "sd1") == "apache-2.0"  # trained by this project: its LICENSE
    own = tmp_path / "base"
    own.mkdir()
    (own / "README.md").write_text("---\nlicense: mit\ntags:\n- x\n---\n# a base\n")
    assert base_license(str(own), str(own), "sd1") == "mit"
    (own / "README.md").write_text("# a card without front matter\n")
    assert base_license(str(own), str(own), "sdxl") == "openrail++"
    assert base_license("runwayml/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5", "sd1") == \
        "creativeml-openrail-m"
