"""Ctrl+C (SIGINT) and SIGTERM during a run (sdlora/training/interrupt.py): a stop at a random step saves a
checkpoint that resumes bit for bit, a second signal exits at once, a stop before training leaves nothing behind.
Real signals to real training processes on the tiny model; the resumes and the reference run in-process."""
import os
import random
import re
import signal
import time

import pytest
import torch
from conftest import make_images
from helpers import fast_flags, read_lora, start
from PIL import Image

import train_text_to_image_lora as t2i
from sdlora.training import checkpoint
from sdlora.training.caches import Caches

WEIGHTS = "pytorch_lora_weights.safetensors"
STEPS = 12  # the resumed and the reference runs' length; a stop comes well before it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs compute as the training subprocesses do (helpers.env: OMP_NUM_THREADS=1), bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("interrupts") / "d", n=4)


@pytest.fixture(scope="module")
def reference(tiny_model, data, tmp_path_factory):
    """The LoRA of an uninterrupted STEPS-step run."""
    out = tmp_path_factory.mktemp("reference") / "o"
    assert t2i.main(fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=STEPS)) == 0
    return read_lora(out / WEIGHTS)[0]


def _wait(proc, log, done):
    """Poll the run's output until `done(text)` (or the run ended)."""
    deadline = time.time() + 300
    while not done(log.read_text(errors="replace")) and proc.poll() is None:
        assert time.time() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.02)


def _step(text: str) -> int:
    """The step the step bar shows last (it skips some: it redraws at most every 0.1 s)."""
    return max([int(n) for n in re.findall(r"\| (\d+)/1000000 ", text)], default=0)


def _finish(proc, timeout=120) -> int:
    try:
        return proc.wait(timeout)
    finally:
        proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_a_random_step_saves_a_checkpoint_that_resumes_bit_identically(tiny_model, data, reference,
                                                                                    tmp_path, sig):
    out, log, at = tmp_path / "o", tmp_path / "run.log", random.randint(2, 6)
    # A long run with a constant LR: its schedule over the first STEPS steps is that of the STEPS-step reference.
    proc = start(fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=10**6), log)
    _wait(proc, log, lambda text: _step(text) >= at)
    proc.send_signal(sig)
    rc = _finish(proc)
    text = log.read_text(errors="replace")
    assert rc == 128 + sig and "Traceback" not in text, text[-3000:]
    said = [line for line in text.splitlines() if "interrupted" in line or "saved" in line]
    assert len(said) == 1, text[-3000:]
    m = re.search(rf"interrupted \({sig.name}\) at step (\d+) of 1000000: saved (\S+); "
                  r"--resume_from_checkpoint latest continues it$", said[0])
    assert m, said
    step = int(m.group(1))
    assert at <= step < STEPS and m.group(2) == str(out / f"checkpoint-{step}")
    assert sorted(p.name for p in out.iterdir()) == [f"checkpoint-{step}"]  # no weights, no temp files
    assert checkpoint.read(out / f"checkpoint-{step}", ["unet"]).step == step

    assert t2i.main(fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=STEPS,
                               resume_from_checkpoint="latest")) == 0
    resumed = read_lora(out / WEIGHTS)[0]
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), f"stopped at step {step}"


def test_a_second_sigint_exits_at_once_and_leaves_no_half_written_file(tiny_model, data, tmp_path):
    out, log = tmp_path / "o", tmp_path / "run.log"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 32 --h 32 --s 100\n")
    # Sampling every 2 steps: a slow stretch between a step and the check for a stop, for both signals to land in.
    proc = start(fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=10**6, checkpointing_steps=1,
                            sample_prompts=prompts, sample_every_n_steps=2), log)
    _wait(proc, log, lambda text: "at step 2" in text)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)  # the first is handled (it only asks to stop after this step), then comes the second
    proc.send_signal(signal.SIGINT)
    rc = _finish(proc)
    text = log.read_text(errors="replace")
    assert rc == 130 and "Traceback" not in text, text[-3000:]
    assert [line for line in text.splitlines() if "interrupted" in line] == [
        "interrupted again (SIGINT): stopped at once, without saving the step it was on; "
        "--resume_from_checkpoint latest continues from checkpoint-2"]
    # It stopped in step 2's samples: the checkpoints before are whole, nothing later was saved, no temp file stays.
    assert sorted(p.name for p in out.iterdir() if p.name != "samples") == ["checkpoint-1", "checkpoint-2"]
    for n in (1, 2):
        assert checkpoint.read(out / f"checkpoint-{n}", ["unet"]).step == n
    for png in (out / "samples").glob("*"):
        assert png.name.startswith("step000002_") and Image.open(png).verify() is None


def test_sigterm_while_caching_stops_at_once_and_leaves_no_folder(tiny_model, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs" / "o"
    real = Caches.build_latents

    def build_latents(self, *a, **kw):  # a real SIGTERM to this process, as the latents start to be encoded
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **kw)
    monkeypatch.setattr(Caches, "build_latents", build_latents)

    def unhandled(*_):
        raise AssertionError("the run left SIGTERM to the handler it found")
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        rc = t2i.main(fast_flags(tiny_model, out, train_data_dir=data))
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the run put back the handler it found
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert rc == 143 and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1] == "stopped (SIGTERM) before training started (during caching latents and text " \
                                   "embeddings); nothing to resume"
    assert not (tmp_path / "runs").exists()  # the folders it made are gone
