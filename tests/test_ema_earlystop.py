"""--use_ema (diffusers' EMAModel of the LoRA) and --early_stopping_patience in-process on the tiny model: the EMA
resumes exactly, draws the validation loss and is saved as the output beside the raw weights; early stopping ends
the run and saves the lowest validation loss's weights, the last ones beside them."""
import pytest
import torch
from conftest import make_images
from helpers import fast_flags, read_lora, recipe_error
from test_optimizers import MODEL, lowers_and_resumes

from sdlora.cli.flags import train_config
from sdlora.recipes import text_to_image as t2i
from sdlora.training import ema, earlystop, loop


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    return make_images(root / "train", n=2), make_images(root / "held", n=2)


def test_ema_resumes_exactly_with_its_shadow_weights(images, tmp_path):
    run = lowers_and_resumes(images, tmp_path, "AdamW", {"use_ema": True, "ema_decay": 0.9, "learning_rate": 1e-2})
    assert run.ema.optimization_step == 4 and run.ema.cur_decay_value == pytest.approx(min(0.9, 4 / 13))
    trained = [p.detach().clone() for p in ema.params(run.parts)]
    # the EMA, built by hand from the run's own decays, is what the shadow holds; the trained weights differ from it
    assert any(not torch.equal(s, p) for s, p in zip(run.ema.shadow_params, trained))
    with loop.evaluating(run):
        assert all(torch.equal(p, s) for p, s in zip(ema.params(run.parts), run.ema.shadow_params))
    assert all(torch.equal(p, t) for p, t in zip(ema.params(run.parts), trained))  # back, bit for bit


def test_ema_shadow_is_the_moving_average(images, tmp_path):
    """EMAModel's update s <- d·s + (1-d)·p with d = min(decay, (1+k)/(10+k)), checked step by step."""
    from sdlora.training import setup, step

    args = t2i.parse_args(fast_flags(MODEL, tmp_path / "o", train_data_dir=images[0], use_ema=True,
                                     ema_decay=0.2, learning_rate=1e-2))
    config = train_config(args)
    run = setup.setup(config, t2i.make_recipe(args, config))
    shadow = [p.detach().clone() for p in ema.params(run.parts)]
    for k in range(1, 4):
        step.optimizer_step(run)
        d = 0.0 if k == 1 else min(0.2, k / (9 + k))  # EMAModel.get_decay: step k-1 of its count
        shadow = [d * s + (1 - d) * p.detach() for s, p in zip(shadow, ema.params(run.parts))]
        assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(shadow, run.ema.shadow_params))
    assert all(s.dtype == torch.float32 for s in run.ema.shadow_params)


def test_ema_output_and_raw_weights(images, tmp_path):
    out = tmp_path / "o"
    assert t2i.main(fast_flags(MODEL, out, train_data_dir=images[0], use_ema=True, ema_decay=0.5,
                               max_train_steps=3, learning_rate=1e-2)) == 0
    output, raw = (read_lora(out / n)[0] for n in ("pytorch_lora_weights.safetensors", ema.RAW_NAME))
    assert output.keys() == raw.keys() and any(not torch.equal(output[k], raw[k]) for k in output)


def test_early_stopping_saves_the_best_steps_weights(images, tmp_path, monkeypatch):
    """Patience 1 with an evaluation every step and a learning rate that makes the loss rise: the run stops at the
    first evaluation without a new lowest; the output is the lowest one's weights, the last ones beside it."""
    values = iter([0.5, 0.4, 0.45, 0.3])  # steps 0, 1, 2 (no new lowest: stop), never 3
    monkeypatch.setattr(loop.heldout, "loss", lambda *a, **k: next(values))
    saved = {}
    real_record = earlystop.EarlyStop.record

    def record(self, improved, params):
        real_record(self, improved, params)
        saved.setdefault("weights", []).append([p.detach().clone() for p in params])
    monkeypatch.setattr(earlystop.EarlyStop, "record", record)
    out = tmp_path / "o"
    assert t2i.main(fast_flags(MODEL, out, train_data_dir=images[0], validation_data_dir=images[1],
                               early_stopping_patience=1, validation_loss_steps=1, max_train_steps=6)) == 0
    best, last = (read_lora(out / n)[0] for n in ("pytorch_lora_weights.safetensors", earlystop.LAST_NAME))
    assert len(saved["weights"]) == 3  # evaluations at steps 0, 1, 2: stopped after step 2
    assert any(not torch.equal(best[k], last[k]) for k in best)
    card = (out / "README.md").read_text()
    assert "at step 1 " in card and "the weights are this step's (early stopping" in card


@pytest.mark.parametrize("flags,expected", [
    ({"early_stopping_patience": 3}, "--early_stopping_patience needs held-out images"),
    ({"early_stopping_patience": 0}, "--early_stopping_patience must be >= 1"),
    ({"min_timestep": 500, "max_timestep": 100}, "--min_timestep 500 / --max_timestep 100: need 0 <= min <= max"),
])
def test_bad_outcome_and_noise_flags(tmp_path, capsys, no_model_loads, flags, expected):
    argv = fast_flags(MODEL, tmp_path / "o", train_data_dir=make_images(tmp_path / "d", n=1), **flags)
    assert expected in recipe_error(capsys, t2i, argv)
