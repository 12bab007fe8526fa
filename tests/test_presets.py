"""The shipped presets (issue #33): each is read and validated by its recipe's own flags, and `--preset` layers
under --config_file and the command line. Their predicted GPU peaks: `python benchmarks/gpu_memory.py --presets`
(minutes per preset on a CPU, so not run here: each preset records its prediction, checked below to fit its label)."""
import pytest

from sdlora.cli import main as sdlora_main
from sdlora.recipes import RECIPES, configfile, presets

NEEDS = {"text-to-image": ["--train_data_dir", "d"], "dreambooth": ["--instance_data_dir", "d", "--instance_prompt",
                                                                   "a sks dog", "--class_prompt", "a dog"]}


@pytest.mark.parametrize("name", presets.names())
def test_each_preset_is_read_and_validated(name, no_model_loads):
    info = presets.about(name)
    assert info["about"] and info["recipe"] in RECIPES and info["arch"] in ("sd15", "sdxl")
    assert presets.label_bytes(info["label"]) >= 8e9
    # the predicted peak (recorded from benchmarks/gpu_memory.py --presets) fits the GPU the label names
    assert presets.label_bytes(info["predicted"].split(" (")[0]) < presets.label_bytes(info["label"])
    recipe = RECIPES[info["recipe"]]
    values = configfile.read(recipe.parser(), presets.path(name), "--preset", info["recipe"])
    args = recipe.parse_args(["--preset", name, *NEEDS[info["recipe"]]])
    assert all(getattr(args, k) == v for k, v in values.items() if not isinstance(v, list))
    assert args.resolution == (1024 if info["arch"] == "sdxl" else 512)


def test_preset_under_config_file_and_flags(tmp_path, capsys, no_model_loads):
    cfg = tmp_path / "c.toml"
    cfg.write_text("rank = 64\nlearning_rate = 2e-4\n")
    t2i = RECIPES["text-to-image"]
    args = t2i.parse_args(["--preset", "sd15-style", "--config_file", str(cfg), "--learning_rate", "3e-4",
                           *NEEDS["text-to-image"]])
    assert (args.rank, args.learning_rate, args.lr_scheduler, args.resolution) == (64, 3e-4, "cosine", 512)
    with pytest.raises(SystemExit):
        t2i.parse_args(["--preset", "sd15-dreambooth", *NEEDS["text-to-image"]])
    assert "is for `sdlora train dreambooth`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        t2i.parse_args(["--preset", "sd15-styl", *NEEDS["text-to-image"]])
    assert "no such preset; did you mean sd15-style?" in capsys.readouterr().err
    assert sdlora_main(["presets"]) == 0
    listed = capsys.readouterr().out
    assert all(n in listed for n in presets.names()) and "24 GB" in listed and "predicted  6.55 GiB" in listed
