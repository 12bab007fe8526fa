"""The optimizers (training/optimizers.py) in-process on the bundled tiny model at 32 px: each one lowers the loss on
the images it trains on and resumes exactly; schedule-free samples, validates and saves with its averaged weights;
LoRA+ splits the LoRA through peft's builder; bad optimizer flags are one line before any model loads."""
import logging

import pytest
import torch
from conftest import make_images
from helpers import fast_flags, read_lora, recipe_error

from sdlora.cli.flags import train_config
from sdlora.recipes import text_to_image as t2i
from sdlora.training import checkpoint, loop, optimizers, saving, setup, step

MODEL = "sdlora-tiny"
# (--optimizer, its flags): learning rates the kohya/diffusers docs suggest, scaled for 4 steps of a tiny LoRA
OPTIMIZERS = [
    ("prodigy", {"learning_rate": 1.0}),  # diffusers' spelling
    ("Adafactor", {}),  # relative step: its own step size and AdafactorSchedule
    ("Lion", {"learning_rate": 3e-4}),
    ("AdamWScheduleFree", {"learning_rate": 1e-2}),
    ("RAdamScheduleFree", {"learning_rate": 1e-2, "optimizer_args": "silent_sgd_phase=False"}),  # steps from the 1st
    ("CAME", {"learning_rate": 1e-3}),
    ("SGDNesterov", {"learning_rate": 0.5}),
    ("torch.optim.RAdam", {"learning_rate": 1e-2}),  # module.Class
]


def _run(data, held, out, **over):
    """A set-up run (setup.setup) of 4 steps, the held-out loss measured on copies of the trained images."""
    args = t2i.parse_args(fast_flags(MODEL, out, train_data_dir=data, validation_data_dir=held, **over))
    config = train_config(args)
    return setup.setup(config, t2i.make_recipe(args, config))


def _lora(run) -> dict:
    return {k: v.clone() for k, v in checkpoint.lora_weights(run.parts["unet"].bare).items()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("optim")
    return make_images(root / "train", n=2), make_images(root / "held", n=2)  # the same two images twice


@pytest.mark.parametrize("name,over", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_optimizer_lowers_the_loss_and_resumes_exactly(images, tmp_path, name, over):
    lowers_and_resumes(images, tmp_path, name, over)


def lowers_and_resumes(images, tmp_path, name: str, over: dict):
    """4 steps lower the held-out loss on the trained images; 4 steps = 2 + a resume from checkpoint-2 + 2, within
    1e-6, with the optimizer's whole state (Prodigy's d, schedule-free's z, Adafactor's factors) in the checkpoint."""
    flags = dict(optimizer=name, checkpointing_steps=2, **over)
    run = _run(*images, tmp_path / "a", **flags)
    assert type(getattr(run.optimizer, "optimizer", run.optimizer)).__name__.lower() == \
        {"sgdnesterov": "sgd", "torch.optim.radam": "radam"}.get(name.lower(), name.lower())
    before = loop.validation_loss(run)
    for _ in range(4):
        step.optimizer_step(run)
        if run.step == 2:
            saving.save_checkpoint(run)
    after = loop.validation_loss(run)
    assert after < before, (before, after)
    resumed = _run(*images, tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"), **flags)
    assert resumed.step == 2
    for _ in range(2):
        step.optimizer_step(resumed)
    full, again = _lora(run), _lora(resumed)
    assert max((full[k] - again[k]).abs().max().item() for k in full) <= 1e-6
    return run


def test_a_resume_with_another_optimizer_is_refused(images, tmp_path, capsys):
    run = _run(*images, tmp_path / "a", optimizer="Lion", learning_rate=3e-4)
    step.optimizer_step(run)
    saving.save_checkpoint(run)
    argv = fast_flags(MODEL, tmp_path / "a", train_data_dir=images[0], validation_data_dir=images[1],
                      learning_rate=3e-4, resume_from_checkpoint="latest")
    line = recipe_error(capsys, t2i, argv)
    assert "settings differ from the checkpoint's (optimizer Lion -> (default)); resume with the same" in line, line


def _trained(run) -> dict:
    return {n: p for n, p in run.parts["unet"].bare.named_parameters() if p.requires_grad}


def test_schedule_free_samples_validates_and_saves_its_averaged_weights(images, tmp_path, monkeypatch):
    """loop.train hands the sampler and the saver schedule-free's eval weights x = (y - (1-β1)·z) / β1 (y: the
    weights it steps, z: its base sequence), and the steps go on with y bit for bit."""
    seen = {}

    def save(run):
        x = {n: p.detach().clone() for n, p in _trained(run).items()}
        run.optimizer.train()
        y = {n: p.detach().clone() for n, p in _trained(run).items()}
        z = {n: run.optimizer.optimizer.state[p]["z"].clone() for n, p in _trained(run).items()}
        seen["save"] = (x, y, z, run.optimizer.param_groups[0]["betas"][0])
        run.optimizer.eval()
    monkeypatch.setattr(loop, "save_final", save)
    monkeypatch.setattr(loop.samples, "write_round", lambda sampling, step: seen.setdefault("sample", {
        n: p.detach().clone() for n, p in sampling.parts["unet"].bare.named_parameters() if p.requires_grad}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    args = t2i.parse_args(fast_flags(MODEL, tmp_path / "o", train_data_dir=images[0], optimizer="AdamWScheduleFree",
                                     max_train_steps=2, learning_rate=1e-2, sample_prompts=prompts,
                                     sample_every_n_steps=2))
    config = train_config(args)
    loop.train(config, t2i.make_recipe(args, config))
    x, y, z, beta1 = seen["save"]
    for n in x:
        assert not torch.equal(x[n], y[n])
        assert torch.allclose(x[n], (y[n] - (1 - beta1) * z[n]) / beta1, atol=1e-7)
        assert torch.equal(seen["sample"][n], x[n])


@pytest.mark.parametrize("flags,expected", [
    ({"optimizer": "Adam9"}, "--optimizer Adam9: unknown; use one of AdamW, AdamW8bit"),
    ({"optimizer_args": "betas=(0.9"}, "--optimizer_args 'betas=(0.9': not key=VALUE"),
    ({"optimizer_args": "decay"}, "--optimizer_args 'decay': not key=VALUE"),
    ({"optimizer": "Lion", "optimizer_args": "foo=1"}, "--optimizer_args foo=…: Lion takes no argument 'foo'"),
    ({"optimizer_args": "lr=1"}, "--optimizer_args lr=…: set the learning rate with --learning_rate"),
    ({"optimizer": "nosuchpkg.Opt"}, "--optimizer nosuchpkg.Opt: nosuchpkg.Opt can't be imported"),
    ({"optimizer": "Prodigy", "use_8bit_adam": True}, "--use_8bit_adam and --optimizer Prodigy contradict"),
    ({"loraplus_lr_ratio": 16, "lora_type": "loha"}, "--loraplus_lr_ratio 16.0: LoRA+ takes a ratio > 0"),
], ids=["unknown", "unparsable", "no-equals", "unknown-arg", "lr", "module", "8bit", "loraplus-loha"])
def test_bad_optimizer_flags_are_one_line_before_any_model_loads(tmp_path, capsys, no_model_loads, flags, expected):
    argv = fast_flags(MODEL, tmp_path / "o", train_data_dir=make_images(tmp_path / "d", n=1), **flags)
    assert expected in recipe_error(capsys, t2i, argv)


def test_a_missing_optimizer_package_names_the_extra(tmp_path, capsys, no_model_loads, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "prodigyopt", None)  # as if not installed
    argv = fast_flags(MODEL, tmp_path / "o", train_data_dir=make_images(tmp_path / "d", n=1), optimizer="prodigy")
    line = recipe_error(capsys, t2i, argv)
    assert "--optimizer Prodigy: prodigyopt.Prodigy can't be imported" in line and 'sdlora[optimizers]' in line


def test_prodigy_flags_and_its_learning_rate_warning(tmp_path, caplog, no_model_loads):
    """diffusers' --prodigy_* flags reach Prodigy (False means off, as diffusers' type=bool never did); a learning
    rate far from 1 is one warning line (as diffusers warns)."""
    data = make_images(tmp_path / "d", n=1)
    with caplog.at_level(logging.WARNING, logger="sdlora"):
        config = train_config(t2i.parse_args(fast_flags(MODEL, tmp_path / "o", train_data_dir=data, optimizer="prodigy",
                                                        learning_rate=1e-4) + ["--prodigy_decouple", "False",
                                                                               "--prodigy_beta3", "0.98"]))
    warned = [r.getMessage() for r in caplog.records if "Prodigy" in r.getMessage()]
    assert len(warned) == 1 and "around 1.0" in warned[0]
    assert config.optimizer == "Prodigy" and config.prodigy_decouple is False
    kw = optimizers.keywords(config, optimizers.kind_of(config.optimizer))
    assert kw == dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, beta3=0.98, decouple=False,
                      use_bias_correction=True, safeguard_warmup=True)


def test_loraplus_groups_come_from_peft(images, tmp_path):
    """--loraplus_lr_ratio: peft's builder puts each lora_B at ratio x the rate, lora_A at the rate; the whole
    LoRA is in the optimizer once."""
    run = _run(*images, tmp_path / "a", loraplus_lr_ratio=16, unet_lr=2e-3)
    groups = [g for g in run.optimizer.param_groups]
    names = {id(p): n for n, p in _trained(run).items()}
    by_lr = {g["lr"]: {names[id(p)].split(".")[-3] for p in g["params"]} for g in groups}
    assert by_lr == {2e-3: {"lora_A"}, 2e-3 * 16: {"lora_B"}}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(names)


def test_the_header_and_card_record_the_optimizer_and_kohyas_options(images, tmp_path):
    out = tmp_path / "o"
    assert t2i.main(fast_flags(MODEL, out, train_data_dir=images[0], max_train_steps=1, optimizer="lion",
                               ip_noise_gamma=0.1, debiased_estimation_loss=True) +
                    ["--optimizer_args", "weight_decay=0.1"]) == 0
    meta = read_lora(out / "pytorch_lora_weights.safetensors")[1]
    assert (meta["ss_optimizer"], meta["ss_ip_noise_gamma"], meta["ss_debiased_estimation"]) == ("Lion", "0.1", "True")
    card = (out / "README.md").read_text()
    assert "Lion" in card and "weight_decay=0.1" in card
    plain = read_lora(_plain_run(images, tmp_path))[1]
    assert not {"ss_optimizer", "ss_ip_noise_gamma", "ss_debiased_estimation", "ss_loss_type"} & set(plain)


def _plain_run(images, tmp_path):
    assert t2i.main(fast_flags(MODEL, tmp_path / "p", train_data_dir=images[0], max_train_steps=1)) == 0
    return tmp_path / "p" / "pytorch_lora_weights.safetensors"
