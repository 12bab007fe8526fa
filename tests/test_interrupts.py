"""Ctrl+C (SIGINT) and SIGTERM during a run (sdlora/training/interrupt.py): a stop at a random step saves a
checkpoint that resumes bit for bit, a second signal exits at once, a stop before training leaves nothing behind.
Real signals: to training processes (exit status, output), and to this process where the moment must be exact."""
import contextlib
import os
import random
import re
import signal
import threading
import time

import pytest
import torch
from conftest import make_images
from helpers import fast_flags, read_lora, start
from PIL import Image

from sdlora.recipes import text_to_image as t2i
from sdlora.cli.run import run
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
    # no weights, no temp files (beside sdlora's record of what it wrote)
    assert sorted(p.name for p in out.iterdir()) == [".sdlora-files.json", f"checkpoint-{step}", "sdlora-config.toml"]
    assert checkpoint.read(out / f"checkpoint-{step}", ["unet"]).step == step

    assert t2i.main(fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=STEPS,
                               resume_from_checkpoint="latest")) == 0
    resumed = read_lora(out / WEIGHTS)[0]
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), f"stopped at step {step}"


def test_a_second_sigint_exits_at_once_and_leaves_no_half_written_file(tiny_model, data, tmp_path, capsys):
    out, prompts = tmp_path / "o", tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 32 --h 32 --s 100\n")
    argv = fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=10**6, checkpointing_steps=1,
                      sample_prompts=prompts, sample_every_n_steps=2)

    again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))

    def on_step(step, logs):
        if step == 2:  # Ctrl+C: the run would stop after this step's checkpoint and samples; Ctrl+C again in those
            os.kill(os.getpid(), signal.SIGINT)
            again.start()
    with _guarded(signal.SIGINT):
        try:
            rc = run(t2i.parse_args(argv), t2i.make_recipe, on_step=on_step)
        finally:
            again.cancel()
    err = capsys.readouterr().err
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    done = checkpoint.list_checkpoints(out)
    assert [p.name for p in done] in (["checkpoint-1"], ["checkpoint-1", "checkpoint-2"])  # nothing after step 2
    assert [line for line in err.splitlines() if "interrupted" in line] == [
        "interrupted again (SIGINT): stopped at once, without saving the step it was on; "
        f"--resume_from_checkpoint latest continues from {done[-1].name}"]
    # Whatever it was writing when it stopped (checkpoint-2, a sample), nothing half-written stays, no temp file.
    assert sorted(p.name for p in out.iterdir() if p.name != "samples") == [".sdlora-files.json"] + [p.name for p in done]
    for c in done:
        assert checkpoint.read(c, ["unet"]).step == int(c.name.split("-")[1])
    for png in (out / "samples").glob("*"):
        assert png.name.startswith("step000002_") and Image.open(png).verify() is None


@contextlib.contextmanager
def _guarded(sig):
    """Without a handler of the run's own, `sig` fails the test instead of ending (or interrupting) pytest; the run
    puts this one back when it ends."""
    def unhandled(*_):
        raise AssertionError(f"the run left {sig.name} to the handler it found")
    before = signal.signal(sig, unhandled)
    try:
        yield
        assert signal.getsignal(sig) is unhandled
    finally:
        signal.signal(sig, before)


def test_sigterm_while_caching_stops_at_once_and_leaves_no_folder(tiny_model, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs" / "o"
    real = Caches.build_latents

    def build_latents(self, *a, **kw):  # a real SIGTERM to this process, as the latents start to be encoded
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **kw)
    monkeypatch.setattr(Caches, "build_latents", build_latents)

    with _guarded(signal.SIGTERM):
        rc = t2i.main(fast_flags(tiny_model, out, train_data_dir=data))
    err = capsys.readouterr().err
    assert rc == 143 and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1] == "stopped (SIGTERM) before training started (during caching latents and text " \
                                   "embeddings); nothing to resume"
    assert not (tmp_path / "runs").exists()  # the folders it made are gone
