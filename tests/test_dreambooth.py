"""DreamBooth: prior preservation, text-encoder LoRA, class images generated once, resumable."""
import pytest
import torch
from conftest import make_images
from helpers import DREAMBOOTH, fast_flags, front_matter, read_lora, recipe_error, run

from sdlora.recipes import dreambooth as db
from sdlora.cli.run import run as run_recipe
from sdlora.data import class_images as dreambooth
from sdlora.training.losses import group_loss


def _flags(model, out, inst, **over):
    base = dict(instance_data_dir=inst, instance_prompt="a photo of sks square", class_prompt="a photo of a square",
                with_prior_preservation=True, num_class_images=3, sample_batch_size=2)
    base.update(over)
    return fast_flags(model, out, **base)


def test_prior_preservation_with_text_encoder_lora(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    inst = make_images(tmp_path / "inst", n=5, captions=False)
    out = tmp_path / "out"
    r = run(DREAMBOOTH, _flags(tiny_model, out, inst, train_text_encoder=True, max_train_steps=3,
                               validation_prompt="a photo of sks square", num_validation_images=1, validation_epochs=1,
                               report_to="tensorboard"))
    assert "generating 3 of 'a photo of a square'" in r.stderr
    classes = sorted(p.name for p in (tmp_path / "out-class-images").iterdir())  # beside the output, not in it
    assert classes == ["class-00000.png", "class-00001.png", "class-00002.png"]
    sd, meta = read_lora(out / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") for k in sd) and any(k.startswith("text_encoder.") for k in sd)
    assert meta["ss_training_comment"] == "dreambooth"
    fm = front_matter(out / "README.md")
    assert fm["instance_prompt"] == "a photo of sks square" and fm["base_model"] == str(tiny_model)
    card = (out / "README.md").read_text()
    assert "a photo of a square" in card and "| prior preservation | True |" in card
    assert "| text encoder LoRA | True |" in card and "widget:" in card and "- dreambooth" in card
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(str(out))
    assert any("lora_A" in n for n, _ in pipe.text_encoder.named_parameters())
    assert any("lora_A" in n for n, _ in pipe.unet.named_parameters())
    # a second run with the same class folder generates nothing
    r2 = run(DREAMBOOTH, _flags(tiny_model, out, inst, max_train_steps=1, overwrite_output_dir=True))
    assert "already holds 3, generating none" in r2.stderr
    # instance and prior losses are logged separately
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    ev.Reload()
    assert {"loss", "loss_instance", "loss_prior"} <= set(ev.Tags()["scalars"])
    inst_, prior_, total_ = (ev.Scalars(k)[0].value for k in ("loss_instance", "loss_prior", "loss"))
    assert total_ == pytest.approx(inst_ + 1.0 * prior_, rel=1e-5)


def test_class_generation_resumes_after_interruption(tiny_model, tmp_path):
    kw = dict(prompt="a photo of a square", wanted=5, resolution=32, batch_size=2, seed=3, dtype=torch.float32,
              device="cpu", steps=3, progress=False)
    full = tmp_path / "full"
    assert dreambooth.generate(str(tiny_model), full, **kw) == 5

    class Killed(Exception):
        pass

    def kill_after_three(path):
        if len(list(path.parent.glob("class-*.png"))) == 3:
            raise Killed()

    part = tmp_path / "part"
    with pytest.raises(Killed):
        dreambooth.generate(str(tiny_model), part, on_image=kill_after_three, **kw)
    assert len(list(part.glob("class-*.png"))) == 3 and not list(part.glob("*.sdlora-tmp"))
    assert dreambooth.generate(str(tiny_model), part, **kw) == 2  # only the missing ones
    assert dreambooth.generate(str(tiny_model), part, **kw) == 0
    for p in sorted(full.iterdir()):
        assert (part / p.name).read_bytes() == p.read_bytes(), f"{p.name} differs from an uninterrupted run"


def test_user_class_images_count(tmp_path):
    make_images(tmp_path, n=2, captions=False)
    (tmp_path / "junk.png").write_bytes(b"bad")
    assert dreambooth.missing_names(tmp_path, 4) == ["class-00000.png", "class-00001.png"]
    assert dreambooth.missing_names(tmp_path, 2) == []


def test_total_loss_is_instance_plus_weighted_prior():
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])  # two instance rows, two class rows
    groups = torch.tensor([0, 0, 1, 1])
    total, parts = group_loss(per_sample, groups, {0: 1.0, 1: 0.5})
    assert parts[0].item() == 2.0 and parts[1].item() == 15.0
    assert total.item() == pytest.approx(2.0 + 0.5 * 15.0)


@pytest.mark.parametrize("setup,over,expect", [
    ("missing", {}, "--instance_data_dir"),
    ("empty", {}, "no readable image"),
    ("ok", {"class_prompt": None}, "--with_prior_preservation needs --class_prompt"),
    ("ok", {"train_text_encoder": True, "pre_compute_text_embeddings": True}, "can't be used with --train_text_encoder"),
    ("ok", {"num_class_images": 0}, "--num_class_images must be >= 1"),
])
def test_bad_input(tiny_model, tmp_path, capsys, no_model_loads, setup, over, expect):
    inst = tmp_path / "inst"
    if setup == "empty":
        inst.mkdir()
        (inst / "notes.txt").write_text("x")
    elif setup == "ok":
        make_images(inst, n=2, captions=False)
    msg = recipe_error(capsys, db, _flags(tiny_model, tmp_path / "o", inst, **over))
    assert expect in msg, msg
    if setup != "ok":
        assert str(inst) in msg


@pytest.mark.parametrize("prompt,class_prompt,warns", [
    ("a photo of a dog", "a photo of a dog", True),
    ("a photo of sks dog", "a photo of a dog", False),
    ("a photo of my dog", "a dog", True),
    ("ohwx man in a suit", "a man", False),
])
def test_rare_identifier_warning(prompt, class_prompt, warns):
    w = dreambooth.identifier_warning(prompt, class_prompt)
    assert (w is not None) == warns
    if warns:
        assert "rare identifier" in w and "dog" in w


def test_warning_is_logged_by_the_script(tiny_model, tmp_path, capsys, no_model_loads):
    inst = make_images(tmp_path / "inst", n=1, captions=False)
    argv = _flags(tiny_model, tmp_path / "o", inst, instance_prompt="a photo of a square", class_prompt=None,
                  with_prior_preservation=False, max_train_steps=1)
    with pytest.raises(AssertionError, match="model was loaded"):
        run_recipe(db.parse_args(argv), db.make_recipe)
    assert "no rare identifier before the class word 'square'" in capsys.readouterr().err


def test_instance_captions_give_each_photo_its_own_prompt(tiny_model, tmp_path, caplog):
    from sdlora.cli.flags import train_config

    inst = make_images(tmp_path / "inst", n=3)  # kohya .txt captions without the identifier
    (inst / "img0.txt").write_text("a photo of sks square on a blue background")
    (inst / "img2.txt").unlink()  # no caption: the instance prompt

    def captions(**over):
        args = db.parse_args(_flags(tiny_model, tmp_path / "o", inst, with_prior_preservation=False, **over))
        return sorted(r.caption for r in db.make_recipe(args, train_config(args)).data.rows)

    assert captions() == ["a photo of sks square"] * 3  # diffusers' behaviour: captions ignored
    with caplog.at_level("WARNING", logger="sdlora"):
        assert captions(instance_captions=True) == ["a blue square on a green background",
                                                    "a photo of sks square", "a photo of sks square on a blue background"]
    assert "1 of 3 captions in --instance_data_dir lack the identifier 'sks' (e.g. img1.png" in caplog.text
    (inst / "img1.txt").write_text("(sks) square, blue.")  # punctuation around the identifier still names it
    caplog.clear()
    with caplog.at_level("WARNING", logger="sdlora"):
        captions(instance_captions=True)
    assert "lack the identifier" not in caplog.text
    for f in inst.glob("*.txt"):
        f.unlink()
    with caplog.at_level("WARNING", logger="sdlora"):  # the flag on a folder without captions: said, not silent
        assert captions(instance_captions=True) == ["a photo of sks square"] * 3
    assert "no photo in" in caplog.text and "has a caption of its own" in caplog.text
