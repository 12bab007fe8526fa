"""kohya's noise and loss options (training/noise.py, losses.py), each against a direct computation of kohya's formula
(sd-scripts' library/custom_train_functions.py and train_util.py) on a fixed batch; then a run with all of them on
trains and resumes exactly, and records them in its resume settings."""
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from sdlora.training import losses, noise
from sdlora.training.config import TrainConfig

SCHED = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
T = torch.tensor([0, 10, 500, 999])
G = torch.Generator().manual_seed(0)
PRED, TARGET = torch.randn(4, 4, 8, 8, generator=G), torch.randn(4, 4, 8, 8, generator=G)
ALL = SCHED.alphas_cumprod[T]
SNR = ALL / (1 - ALL)


def _options(**over):
    return TrainConfig(**over)  # the settings' declared defaults, `over` changed


@pytest.mark.parametrize("schedule,c_t", [
    ("constant", torch.full((4,), 0.1 * 2.0)),
    ("exponential", 0.1 ** (T / 1000) * 2.0),  # exp(-(-ln c / T)·t)·scale = c^(t/T)·scale
    ("snr", (1 - 0.1) / (1 + ((1 - ALL) / ALL).sqrt()) ** 2 + 0.1),  # kohya's snr schedule has no scale
])
@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_huber_losses_and_schedules(schedule, c_t, loss_type):
    o = _options(loss_type=loss_type, huber_schedule=schedule, huber_c=0.1, huber_scale=2.0)
    got = losses.per_sample_loss(PRED, TARGET, SCHED, T, None, None, o)
    c = c_t.view(4, 1, 1, 1).float()
    pseudo = torch.sqrt((PRED - TARGET) ** 2 + c ** 2) - c
    expected = ((2 * c if loss_type == "huber" else 2) * pseudo).mean(dim=(1, 2, 3))
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_l1_and_default_l2():
    assert torch.allclose(losses.per_sample_loss(PRED, TARGET, SCHED, T, None, None, _options(loss_type="l1")),
                          (PRED - TARGET).abs().mean(dim=(1, 2, 3)))
    l2 = ((PRED - TARGET) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(losses.per_sample_loss(PRED, TARGET, SCHED, T, None, None, _options()), l2)
    assert torch.equal(losses.per_sample_loss(PRED, TARGET, SCHED, T, None, None, _options()),
                       losses.per_sample_loss(PRED, TARGET, SCHED, T, None))  # the defaults change nothing


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_snr_weightings(prediction):
    sched = DDPMScheduler.from_config(SCHED.config, prediction_type=prediction)
    l2 = ((PRED - TARGET) ** 2).mean(dim=(1, 2, 3))
    snr = SNR.clamp(max=1000)  # kohya clamps the SNR of timestep 0 (near infinite) at 1000
    cases = {
        "debiased_estimation_loss": l2 * (1 / (snr + 1) if prediction == "v_prediction" else 1 / snr.sqrt()),
        "scale_v_pred_loss_like_noise_pred": l2 * snr / (snr + 1),
    }
    for flag, expected in cases.items():
        got = losses.per_sample_loss(PRED, TARGET, sched, T, None, None, _options(**{flag: True}))
        assert torch.allclose(got, expected.float(), rtol=1e-4), flag
    got = losses.per_sample_loss(PRED, TARGET, sched, T, None, None, _options(v_pred_like_loss=0.5))
    assert torch.allclose(got, (l2 + l2 / (snr / (snr + 1)) * 0.5).float(), rtol=1e-4)


def test_multires_noise_is_kohyas_pyramid():
    base = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    got = noise.multires(base, 6, 0.3, torch.Generator().manual_seed(2))
    g, expected = torch.Generator().manual_seed(2), base.clone()
    up = torch.nn.Upsample(size=(16, 16), mode="bilinear")  # kohya's pyramid_noise_like, its random draws from g
    for i in range(6):
        r = torch.rand((), generator=g).item() * 2 + 2
        wn = hn = max(1, int(16 / (r ** i)))
        expected += up(torch.randn(2, 4, wn, hn, generator=g)) * 0.3 ** i
        if wn == 1:
            break
    expected /= expected.std()
    assert torch.allclose(got, expected, atol=1e-6) and abs(got.std().item() - 1) < 1e-5


def test_input_perturbation_and_timestep_range():
    base = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert noise.perturbed(base, None, False, torch.Generator()) is base
    g = torch.Generator().manual_seed(3)
    assert torch.equal(noise.perturbed(base, 0.1, False, torch.Generator().manual_seed(3)),
                       base + 0.1 * torch.randn(base.shape, generator=g))
    g = torch.Generator().manual_seed(3)
    strength = torch.rand((), generator=g).item() * 0.1
    assert torch.equal(noise.perturbed(base, 0.1, True, torch.Generator().manual_seed(3)),
                       base + strength * torch.randn(base.shape, generator=g))
    t = noise.timesteps(10_000, 1000, 200, 400, torch.Generator().manual_seed(0))
    assert t.min() == 200 and t.max() == 399
    assert torch.equal(noise.timesteps(3, 1000, 500, 500, torch.Generator()), torch.full((3,), 500))
    assert torch.equal(noise.timesteps(5, 1000, None, None, torch.Generator().manual_seed(4)),
                       torch.randint(0, 1000, (5,), generator=torch.Generator().manual_seed(4)))


def test_exponential_threshold_formula():
    o = SimpleNamespace(loss_type="huber", huber_schedule="exponential", huber_c=0.1, huber_scale=1.0)
    alpha = -math.log(0.1) / 1000
    assert torch.allclose(losses.huber_threshold(o, SCHED, T), torch.exp(-alpha * T))


def test_a_run_with_every_option_trains_resumes_exactly_and_records_them(tmp_path):
    from conftest import make_images
    from test_optimizers import lowers_and_resumes

    flags = dict(multires_noise_iterations=4, multires_noise_discount=0.2, ip_noise_gamma=0.1,
                 ip_noise_gamma_random_strength=True, min_timestep=100, max_timestep=900, loss_type="smooth_l1",
                 huber_schedule="exponential", debiased_estimation_loss=True)
    images = make_images(tmp_path / "train", n=2), make_images(tmp_path / "held", n=2)
    run = lowers_and_resumes(images, tmp_path, "AdamW", flags)
    assert {k: run.settings[k] for k in flags} == flags  # a resume with any of them changed is refused
