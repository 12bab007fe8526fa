"""kohya's --dataset_config (issue #33): subsets with their own repeats, caption files and is_reg, datasets at their
own resolution, batches of one dataset, the resume digest over every subset."""
import re

import pytest
import torch

from conftest import make_images
from helpers import fast_flags, read_lora
from sdlora.cli.flags import train_config
from sdlora.data.trainset import StreamSampler
from sdlora.lora.formats import WEIGHTS_NAME as WEIGHTS
from sdlora.recipes import text_to_image as t2i

# kohya's layout (docs/config_README-en.md): a style folder twice per epoch with .txt captions, regularisation images
# captioned .caption (or by class_tokens), and the same style folder again at a second resolution
DATASETS = """\
[general]
shuffle_caption = false
caption_extension = ".txt"
batch_size = 2

[[datasets]]
resolution = 32

  [[datasets.subsets]]
  image_dir = "{style}"
  num_repeats = 2

  [[datasets.subsets]]
  image_dir = "{reg}"
  is_reg = true
  caption_extension = ".caption"
  class_tokens = "a square"

[[datasets]]
resolution = [48, 48]

  [[datasets.subsets]]
  image_dir = "{style}"
"""
CONFIG = """\
[model_arguments]
pretrained_model_name_or_path = "{model}"
[dataset_arguments]
dataset_config = "{datasets}"
[training_arguments]
output_dir = "{out}"
max_train_steps = 4
seed = 0
prior_loss_weight = 0.5
learning_rate = 1e-3
log_with = "none"
save_every_n_steps = 1000
[network_arguments]
network_module = "networks.lora"
network_dim = 4
network_train_unet_only = true
"""


@pytest.fixture
def folders(tmp_path):
    style = make_images(tmp_path / "style", n=4)
    reg = make_images(tmp_path / "reg", n=3, size=40)
    for i, p in enumerate(sorted(reg.glob("*.txt"))):
        p.unlink() if i == 0 else p.rename(p.with_suffix(".caption"))  # the first: captioned by class_tokens
    return style, reg


def write_pair(tmp_path, tiny_model, style, reg, out) -> str:
    data = tmp_path / "data.toml"
    data.write_text(DATASETS.format(style=style, reg=reg))
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG.format(model=tiny_model, datasets=data, out=out))
    return str(cfg)


def test_two_subsets_one_is_reg_at_two_resolutions(tiny_model, tmp_path, folders, capsys, no_model_loads):
    """What the pair trains on, read without loading a model: repeats, caption files and class_tokens, reg images
    balanced to the training images per dataset (kohya), and batches that never mix datasets."""
    style, reg = folders
    args = t2i.parse_args(["--config_file", write_pair(tmp_path, tiny_model, style, reg, tmp_path / "o")])
    assert args.train_batch_size == 2 and args.rank == 4 and args.prior_loss_weight == 0.5
    config = train_config(args)
    recipe = t2i.make_recipe(args, config)
    data = recipe.data
    assert recipe.group_weights == {0: 1.0, 1: 0.5}
    per_part = {}
    for e in data.examples:
        per_part.setdefault(data.part(e[0]).name, []).append(e[0])
    assert {k: len(v) for k, v in per_part.items()} == {"dataset 1: style": 8, "dataset 1: reg": 8, "dataset 2: style": 4}
    captions = {data.rows[r].caption for r in per_part["dataset 1: reg"]}
    assert "a square" in captions and len(captions) == 3  # two .caption files and class_tokens
    assert {data.buckets[r] for r in per_part["dataset 2: style"]} == {(48, 48)}
    assert {data.buckets[r] for r in per_part["dataset 1: reg"]} == {(32, 32)}
    sampler = StreamSampler(len(data), 2, seed=0, keys=[data.key(i) for i in range(len(data))])
    for m in range(3 * sampler.batches_per_epoch):
        sizes = {data.buckets[data.examples[i][0]] for _, i in sampler.batch(m)}
        datasets = {data.part(data.examples[i][0]).dataset for _, i in sampler.batch(m)}
        assert len(sizes) == 1 and len(datasets) == 1
    # the resume digest covers each subset's own settings
    (tmp_path / "data.toml").write_text(DATASETS.format(style=style, reg=reg).replace("num_repeats = 2",
                                                                                        "num_repeats = 2\n  flip_aug = true"))
    other = t2i.make_recipe(args, config).data
    assert other.digest() != data.digest()


def test_the_pair_trains_and_logs_a_bucket_table_per_dataset(tiny_model, tmp_path, folders, capsys):
    style, reg = folders
    assert t2i.main(["--config_file", write_pair(tmp_path, tiny_model, style, reg, tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"dataset 1 \(style, reg\) at 32 px, buckets \(w x h: images\): 32x32: 7", err), err
    assert re.search(r"dataset 2 \(style\) at 48 px, buckets \(w x h: images\): 48x48: 4", err), err
    sd, _ = read_lora(tmp_path / "o" / WEIGHTS)
    assert sd and all(torch.isfinite(v).all() for v in sd.values())


def test_a_subset_trains_the_lora_of_the_same_folder_as_flags(tiny_model, tmp_path):
    """One subset, repeated twice, .caption files: the LoRA of --train_data_dir with a kohya 2_name folder."""
    folder = make_images(tmp_path / "flat" / "2_sq", n=3)
    for p in folder.glob("*.txt"):
        p.rename(p.with_suffix(".caption"))
    data = tmp_path / "data.toml"
    data.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{folder}"\nnum_repeats = 2\n')
    common = dict(max_train_steps=3, caption_extension=".caption", random_flip=True)
    assert t2i.main(fast_flags(tiny_model, tmp_path / "a", dataset_config=data, **common)) == 0
    assert t2i.main(fast_flags(tiny_model, tmp_path / "b", train_data_dir=tmp_path / "flat", **common)) == 0
    a, b = read_lora(tmp_path / "a" / WEIGHTS)[0], read_lora(tmp_path / "b" / WEIGHTS)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_dataset_files_are_one_line_each(tmp_path, capsys, no_model_loads):
    (tmp_path / "img").mkdir()
    data = tmp_path / "d.toml"

    def error(text):
        data.write_text(text)
        with pytest.raises(SystemExit):
            t2i.main(["--pretrained_model_name_or_path", "sdlora-tiny", "--dataset_config", str(data),
                      "--output_dir", str(tmp_path / "o")])
        return capsys.readouterr().err

    def trained(text):
        data.write_text(text)
        assert t2i.main(["--pretrained_model_name_or_path", "sdlora-tiny", "--dataset_config", str(data),
                         "--output_dir", str(tmp_path / "o")]) == 2
        return capsys.readouterr().err.strip()

    sub = f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\n'
    said = trained(sub + "color_aug = true\nface_crop_aug_range = [1.0, 2.0]\n").splitlines()
    assert len(said) == 2 and "color_aug: kohya's dataset setting has no sdlora equivalent" in said[0]
    assert "num_repeats = \"2\": expected int" in trained(sub + 'num_repeats = "2"\n')
    assert "resolution = [512, 768]: one square size" in trained('[general]\nresolution = [512, 768]\n' + sub)
    assert "different batch_size" in error('[[datasets]]\nbatch_size = 1\n[[datasets]]\nbatch_size = 2\n')
