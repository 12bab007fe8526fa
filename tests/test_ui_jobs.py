"""The UI's training runs without a browser: real worker processes on the tiny model (sdlora/ui/jobs.py, worker.py),
and `sdlora ui`'s refusal to listen beyond this machine without a login. No Gradio needed."""
import json
import os
import re
import socket
import subprocess
import time

import pytest
from conftest import PY, make_images

from sdlora.errors import UserError
from sdlora.training.outdir import LOCK_NAME
from sdlora.ui import jobs


def flags(model, data, out, *more):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", "32", "--report_to", "none", "--seed", "0", *more]


def wait(out, until, timeout=120, pause=0.2):
    t = time.time()
    while time.time() - t < timeout:
        st = jobs.state(out)
        if until(st):
            return st
        time.sleep(pause)
    raise AssertionError(f"timed out; last state: {st.line()}")


def test_bad_input_is_one_line_and_leaves_no_folder(tmp_path, tiny_model):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.bin").write_bytes(b"\x00not an image")
    cases = {"missing": tmp_path / "nope", "junk": tmp_path / "junk"}
    outs = {k: tmp_path / f"runs-{k}" / "out" for k in cases}
    for k, data in cases.items():  # both children check at once
        jobs.start("text-to-image", flags(tiny_model, data, outs[k]), outs[k])
    for k in cases:
        st = wait(outs[k], lambda s: not s.starting)
        assert st.error.startswith(f"error: --train_data_dir {cases[k]}")
        assert "\n" not in st.error and not st.running
        assert not outs[k].parent.exists()  # the run made both folders, the run removed both


def live_process():
    return subprocess.Popen(["sleep", "3600"])


def test_run_survives_the_ui_stops_with_a_checkpoint_and_resumes(tmp_path, tiny_model):
    data, out = make_images(tmp_path / "data"), tmp_path / "run"
    run = flags(tiny_model, data, out, "--max_train_steps", "400", "--checkpointing_steps", "1000",
                "--sample_every_n_steps", "3")
    prompts = "a red square --w 32 --h 32 --s 2\n"
    # The lock a killed (kill -9) run left, naming a pid that is in use again: it blocks nothing.
    out.mkdir()
    other = live_process()
    (out / LOCK_NAME).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": "then"}))
    job = jobs.start("text-to-image", run, out, sample_prompts=prompts)
    with pytest.raises(UserError, match="in use by another sdlora run"):
        jobs.start("text-to-image", run, out)  # the same run twice: refused before any process starts
    st = wait(out, lambda s: s.planned or s.error)  # as soon as the run has read its data
    assert st.planned["max_steps"] == 400 and st.planned["resolution"] == 32 and st.planned["images"] == 4
    assert st.loss or "planned: 400 steps at 32 px" in st.line()
    st = wait(out, lambda s: s.step >= 5 or s.error)
    assert st.running and st.max_steps == 400 and st.loss and st.s_per_step > 0 and st.lr == pytest.approx(1e-4)
    assert f"ETA {jobs.clock(st.eta_s)}" in st.line()
    # A restarted UI knows nothing in memory: the folder alone says a run is going, and what it did.
    jobs.launched.clear()
    st = wait(out, lambda s: s.samples)
    assert st.running and st.samples[0].parent == out / "samples"
    # A link put in samples/ (to any file of the user's) is not one of the run's samples: never shown nor served.
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"the user's private file")
    (out / "samples" / "zzz.png").symlink_to(secret)
    assert all(not p.is_symlink() for p in jobs.state(out).samples)
    (out / "samples" / "zzz.png").unlink()
    st = wait(out, lambda s: s.phase == "sampling" or not s.running, pause=0.02)
    assert st.line().startswith(f"running, sampling…: step {st.step}/400")
    with pytest.raises(UserError, match=f"pid {job.proc.pid}"):
        jobs.start("text-to-image", run, out)
    jobs.stop(out)
    st = wait(out, lambda s: not s.running)
    assert st.stopped and not st.finished and not st.error and st.step < 400
    assert other.poll() is None
    other.kill()
    # s/step is the optimizer step's own time: the sampling after a step is not counted in the next one.
    records = [json.loads(line) for line in (out / "logs" / "progress.jsonl").read_text().splitlines()]
    sampled = [(b["time"] - a["time"], c["s_per_step"]) for a, b, c in zip(records, records[1:], records[2:])
               if a.get("phase") == "sampling" and b.get("phase") == "training" and "step" in c]
    assert sampled and all(step < sampling for sampling, step in sampled), sampled
    assert (out / f"checkpoint-{st.step}").is_dir() and not (out / "pytorch_lora_weights.safetensors").exists()
    stopped_at = st.step
    resume = ["--checkpointing_steps", "1000", "--resume_from_checkpoint", "latest"]
    jobs.start("text-to-image", run + ["--rank", "8"] + resume, out, sample_prompts=prompts)  # not the run that wrote the checkpoint
    st = wait(out, lambda s: not s.starting and not s.running)
    assert st.error.startswith("error: ") and "rank" in st.error and "\n" not in st.error
    assert sorted(p.name for p in out.iterdir()) == [".sdlora-files.json", "checkpoint-%d" % stopped_at, "logs", "samples",
                                                     "sdlora-config.toml"]
    jobs.start("text-to-image", run[:run.index("--max_train_steps")] + ["--max_train_steps", str(stopped_at + 3),
               "--checkpointing_steps", "1000", "--resume_from_checkpoint", "latest"], out)
    st = wait(out, lambda s: not s.starting and not s.running)
    assert st.finished and st.step == stopped_at + 3 and st.weights == out / "pytorch_lora_weights.safetensors"
    steps = [json.loads(line).get("step") for line in (out / "logs" / "progress.jsonl").read_text().splitlines()]
    assert steps.count(stopped_at + 1) == 1  # the resumed run went on from the checkpoint's step


def test_stop_while_the_run_loads_ends_it_there(tmp_path, tiny_model):
    """Stop before the first step (loading the models, caching 100 latents): the run ends at once, shown as stopped,
    with nothing to resume — not after caching and a first step."""
    data, out = make_images(tmp_path / "data", n=100), tmp_path / "run"
    jobs.start("text-to-image", flags(tiny_model, data, out, "--max_train_steps", "5"), out)
    st = wait(out, lambda s: not s.starting)  # it holds its folder: next it loads the models
    assert st.running and not st.error and st.line() == "running: loading the models: planned: 5 steps at 32 px"
    jobs.stop(out)
    st = wait(out, lambda s: not s.running)
    assert st.stopped and not st.finished and not st.error and st.step == 0, st.line()
    assert st.line() == "stopped before training started"
    # no checkpoint, no weights: only the UI's log (and sdlora's record of having written it)
    assert sorted(p.name for p in out.iterdir()) == [".sdlora-files.json", "logs"]
    last = (out / "logs" / "train.log").read_text().splitlines()[-1]
    assert re.fullmatch(r"stopped \(SIGTERM\) before training started \(during [a-zA-Z ]+\); nothing to resume", last)


def test_crash_after_the_run_started_is_one_line(tmp_path, tiny_model):
    """A run that dies with a traceback once it holds its folder (a UNet whose weights are named for another model:
    whole and well-formed, so no check before loading can tell) is shown as its last line, with where the log is."""
    from safetensors.torch import load_file, save_file

    data, out = make_images(tmp_path / "data"), tmp_path / "run"
    broken = tmp_path / "model"
    subprocess.run(["cp", "-r", str(tiny_model), str(broken)], check=True)
    for f in (broken / "unet").glob("*.safetensors"):
        save_file({f"other.{k}": v for k, v in load_file(f).items()}, f)
    jobs.start("text-to-image", flags(broken, data, out, "--num_train_epochs", "3", "--train_batch_size", "2"), out)
    st = wait(out, lambda s: not s.starting and not s.running)
    assert st.error.startswith("error: the run failed (") and "\n" not in st.error, st.error
    assert str(out / "logs" / "train.log") in st.error
    assert st.planned["max_steps"] == 6  # planned before the models load: 3 epochs of 4 images in batches of 2


def test_stop_signals_only_a_run_that_holds_its_folder(tmp_path):
    """A lock file naming a pid is not enough: Stop signals a process only while it holds the folder's lock and is
    an sdlora run. Neither a lock no one holds (left by a kill -9, or forged) nor one held by another program."""
    out, victim = tmp_path / "out", live_process()
    out.mkdir()
    lock = out / LOCK_NAME
    lock.write_text(json.dumps({"pid": victim.pid, "host": socket.gethostname(), "started": "then"}))
    with pytest.raises(UserError, match=f"no run is going in {out}"):
        jobs.stop(out)  # no one holds the lock
    holding = subprocess.Popen([PY, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                                "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
                                str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holding.stdout.readline() == "held\n"
        for pid in (victim.pid, holding.pid):  # held, by a program that is not sdlora, whichever pid it names
            lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
            assert jobs.holder(out) is None
            with pytest.raises(UserError, match="no run is going"):
                jobs.stop(out)
        time.sleep(0.2)
        assert victim.poll() is None and holding.poll() is None
    finally:
        victim.kill()
        holding.kill()


@pytest.mark.parametrize("argv,message", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 listens beyond this machine: give --auth"),
    (["--host", "192.168.1.5", "--auth", "nopassword"], "--auth: expected USER:PASSWORD"),
    (["--host", "::", "--auth-file", "/nonexistent/pw"], "--auth-file /nonexistent/pw: can't read it"),
])
def test_ui_refuses_to_listen_beyond_this_machine_without_a_login(argv, message):
    r = subprocess.run([PY, "-m", "sdlora.cli", "ui", *argv], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {r.stderr.strip()[7:]}" and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "nopassword" not in r.stderr
