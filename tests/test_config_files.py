"""Runs as files (issue #33): --config_file (kohya's too), --output_config, the run folder's own settings, resume
from the folder alone."""
import sys

import pytest
import torch

from sdlora.recipes import dreambooth as db
from sdlora.recipes import text_to_image as t2i
from conftest import make_images
from helpers import fast_flags, read_lora
from sdlora.lora.formats import WEIGHTS_NAME as WEIGHTS
from sdlora.training.runconfig import NAME as RUN_CONFIG

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

STEPS = 4
# kohya's train_network.py settings, laid out in sections as kohya_ss writes them
KOHYA = """\
[model_arguments]
pretrained_model_name_or_path = "{model}"

[dataset_arguments]
train_data_dir = "{data}"
resolution = "32,32"
caption_extension = ".txt"

[training_arguments]
output_dir = "{out}"
train_batch_size = 2
max_train_steps = {steps}
max_train_epochs = 3
seed = 0
save_every_n_steps = 1000
optimizer_type = "AdamW"
mixed_precision = "no"
log_with = "tensorboard"
cache_latents = true

[network_arguments]
network_module = "lycoris.kohya"
network_args = ["algo=loha"]
network_dim = 4
network_alpha = 2
network_train_unet_only = true
unet_lr = 1e-3
"""
# what the file says, as sdlora's flags
AS_FLAGS = dict(lora_type="loha", rank=4, lora_alpha=2, num_train_epochs=3, checkpointing_steps=1000,
                caption_extension=".txt", learning_rate=1e-3, mixed_precision="no")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("cfg") / "data", n=4)


@pytest.fixture(scope="module")
def reference(tiny_model, data, tmp_path_factory):
    """The LoRA of the flags-only run."""
    out = tmp_path_factory.mktemp("ref") / "o"
    assert t2i.main(fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=STEPS, **AS_FLAGS)) == 0
    return read_lora(out / WEIGHTS)[0], out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kohya_config_file_trains_the_flags_lora_and_output_config_reproduces_it(tiny_model, data, reference,
                                                                                 tmp_path, capsys):
    kohya = tmp_path / "kohya.toml"
    kohya.write_text(KOHYA.format(model=tiny_model, data=data, out=tmp_path / "k", steps=STEPS))
    assert t2i.main(["--config_file", str(kohya), "--report_to", "none"]) == 0  # a flag beside the file wins
    assert same(read_lora(tmp_path / "k" / WEIGHTS)[0], reference[0])
    saved = tomllib.loads((tmp_path / "k" / RUN_CONFIG).read_text())
    assert saved["lora_type"] == "loha" and saved["rank"] == 4 and saved["report_to"] == "none"
    assert saved["output_dir"] == str(tmp_path / "k") and "hub_token" not in saved  # every flag but secrets
    assert saved["lr_scheduler"] == "constant" and saved["train_text_encoder"] is False  # defaults written too

    # --output_config: the resolved settings of the same command, fed back as --config_file: the same LoRA
    resolved = tmp_path / "resolved.toml"
    with pytest.raises(SystemExit) as e:
        t2i.parse_args(["--config_file", str(kohya), "--report_to", "none", "--output_config", str(resolved)])
    assert e.value.code == 0 and not (tmp_path / "k2").exists()
    assert resolved.read_text().startswith("# train_text_to_image_lora.py settings")
    again = tomllib.loads(resolved.read_text())
    assert again["rank"] == 4 and again["lora_type"] == "loha" and "unet_lr" not in again  # sdlora's names
    assert t2i.main(["--config_file", str(resolved), "--output_dir", str(tmp_path / "k2")]) == 0
    assert same(read_lora(tmp_path / "k2" / WEIGHTS)[0], reference[0])
    # nothing written over a file that exists
    with pytest.raises(SystemExit) as e:
        t2i.parse_args(["--config_file", str(kohya), "--output_config", str(resolved)])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err


def test_resume_with_only_the_folder_is_exact(tiny_model, data, reference, tmp_path, capsys):
    out = tmp_path / "o"
    flags = fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=STEPS, **AS_FLAGS)
    steps = []  # stopped after step 2, as the UI's Stop does: a checkpoint at that step
    t2i.main(flags, on_step=lambda step, logs: steps.append(step), should_stop=lambda: steps[-1:] == [2] and "Stop")
    ckpt = out / "checkpoint-2"
    assert (out / RUN_CONFIG).is_file() and not (out / WEIGHTS).exists()
    # a flag that differs from the run's: the existing one-line settings error
    assert t2i.main(["--resume_from_checkpoint", str(ckpt), "--rank", "8"]) == 2
    err = capsys.readouterr().err
    assert "settings differ from the checkpoint's" in err and "rank" in err
    assert t2i.main(["--resume_from_checkpoint", str(ckpt)]) == 0  # the folder's settings, no other flag
    assert same(read_lora(out / WEIGHTS)[0], reference[0])


def test_file_values_are_checked_as_flags_and_the_command_line_wins(tmp_path, capsys, no_model_loads):
    cfg = tmp_path / "c.toml"

    def error(text: str, argv=()) -> str:
        cfg.write_text(text)
        with pytest.raises(SystemExit) as e:
            t2i.parse_args(["--config_file", str(cfg), *argv])
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        return "\n".join(lines)

    base = 'pretrained_model_name_or_path = "sdlora-tiny"\ntrain_data_dir = "d"\n'
    assert error(base + "learning_rat = 1e-4\n") == \
        f"error: --config_file {cfg}: unknown key 'learning_rat'; did you mean 'learning_rate'? (keys are the flag " \
        "names that --help lists)"
    assert "rank = 4.5: not a valid int (as --rank)" in error(base + "rank = 4.5\n")
    assert "lr_scheduler = \"cosin\": one of linear, cosine" in error(base + 'lr_scheduler = "cosin"\n')
    assert "center_crop = \"yes\": true or false" in error(base + 'center_crop = "yes"\n')
    assert "prodigy_decouple = 2" in error(base + "prodigy_decouple = 2\n")  # a true/false word flag takes a bool
    cfg.write_text(base + "prodigy_decouple = false\n")
    assert t2i.parse_args(["--config_file", str(cfg)]).prodigy_decouple is False
    assert "rank is set twice" in error(base + "rank = 4\n[network]\nrank = 8\n")
    assert "not valid TOML" in error("rank = \n")
    # kohya settings sdlora has no equivalent for: one line each, naming them
    said = error(base + 'max_token_length = 150\nsave_every_n_epochs = 1\nnetwork_module = "lycoris.kohya"\n'
                        'network_args = ["algo=glora", "conv_dim=4"]\noptimizer_type = "Prodigy"\n').splitlines()
    assert len(said) == 4 and all(str(cfg) in line for line in said), said  # Prodigy: kohya's name, taken
    assert [k for k in ("max_token_length", "save_every_n_epochs", "algo=glora", "conv_dim=4")
            if not any(k in line for line in said)] == []
    # the file's value under the command line's, lists and kohya's sections
    cfg.write_text(base + "rank = 8\nlearning_rate = 3e-4\n[training_arguments]\nflip_aug = true\n"
                          'target_modules = ["to_q", "to_v"]\nseed = 7\n')
    args = t2i.parse_args(["--config_file", str(cfg), "--rank", "16"])
    assert (args.rank, args.learning_rate, args.random_flip, args.target_modules, args.seed) == \
        (16, 3e-4, True, "to_q,to_v", 7)
    # kohya's output_name names the run's folder (so its kohya file), LyCORIS's algo=lokr is --lora_type lokr
    cfg.write_text(base + 'output_dir = "runs"\noutput_name = "mine"\nnetwork_module = "lycoris.kohya"\n'
                          'network_args = ["algo=lokr"]\nnetwork_dim = 8\n')
    args = t2i.parse_args(["--config_file", str(cfg)])
    assert (args.output_dir, args.lora_type, args.rank, args.train_text_encoder, args.caption_extension) == \
        ("runs/mine", "lokr", 8, True, ".caption")  # kohya's defaults for its own files
    # DreamBooth: kohya's train_data_dir is the instance folder
    cfg.write_text(base + 'instance_prompt = "a sks dog"\n')
    assert db.parse_args(["--config_file", str(cfg)]).instance_data_dir == "d"


def test_no_kohya_key_is_refused_that_sdlora_has_as_a_flag():
    """kohya's refusal list names only settings sdlora lacks: a flag added since (clip_skip, weighting_scheme, the
    noise options) is read from a config file as the flag, and a resumed run's own saved settings load back."""
    from sdlora.recipes import RECIPES, kohya

    for name, recipe in RECIPES.items():
        flags = {a.dest for a in recipe.parser()._actions if a.option_strings}
        assert not set(kohya.UNSUPPORTED) & flags, name
        assert kohya.translate({"clip_skip": 2, "weighting_scheme": "mode"}, "f", name, frozenset(flags)) == \
            {"clip_skip": 2, "weighting_scheme": "mode"}


def test_kohyas_loraplus_network_args_become_the_loraplus_flags():
    """kohya passes LoRA+ as networks.lora's network_args; they are sdlora's --loraplus_* flags, and a bad value or
    another networks.lora option is one line."""
    from sdlora.errors import UserError
    from sdlora.recipes import kohya

    got = kohya.translate({"network_module": "networks.lora", "network_train_unet_only": True,
                           "network_args": ["loraplus_lr_ratio=16", "loraplus_text_encoder_lr_ratio=4"]},
                          "f", "text-to-image")
    assert got["loraplus_lr_ratio"] == 16.0 and got["loraplus_text_encoder_lr_ratio"] == 4.0
    with pytest.raises(UserError) as e:
        kohya.translate({"network_module": "networks.lora", "network_args": ["loraplus_lr_ratio=x", "conv_dim=4"]},
                        "f", "text-to-image")
    assert str(e.value).splitlines() == ["f: network_args loraplus_lr_ratio=x: a number, as kohya reads it",
                                         "f: network_args conv_dim: kohya's networks.lora option has no sdlora "
                                         "equivalent"]
