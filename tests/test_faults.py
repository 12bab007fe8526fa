"""Faults a real user meets: a busy or reused output folder, killed runs, damaged checkpoints, a full disk,
umask, byte-identical reruns, a failed upload, and a quiet log. Each on the tiny model, through the scripts."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import make_images
from helpers import ROOT, T2I, env, fast_flags, read_lora, recipe_error, run, start, wait_for
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdlora.io
import sdlora.models
import sdlora.output.hub
from sdlora.recipes import text_to_image as t2i

WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture
def data(tmp_path):
    return make_images(tmp_path / "d", n=4)


# ---------------------------------------------------------------- one run per folder

def test_second_run_into_a_busy_output_dir_is_refused_and_the_lock_dies_with_its_holder(tiny_model, tmp_path, data):
    out = tmp_path / "o"
    log = tmp_path / "a.log"
    a = start(fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=10**6, checkpointing_steps=10**6), log)
    try:
        wait_for(lambda: "training text-to-image LoRA" in log.read_text(), "run A to start training")
        b = run(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=1), check=False)
        assert b.returncode == 2, b.stderr[-2000:]
        lines = [x for x in b.stderr.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and f"pid {a.pid}" in lines[0] and "in use by another sdlora run" in lines[0]
        assert "Traceback" not in b.stderr
        assert a.poll() is None  # A was not disturbed
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    # kill -9 leaves no stale lock: the next run just works
    c = run(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=1))
    assert c.returncode == 0 and (out / WEIGHTS).exists()
    assert not (out / ".sdlora.lock").exists()  # a finished run leaves no lock file behind


def test_resume_refuses_a_checkpoint_with_other_settings_before_loading(tiny_model, tmp_path, data, capsys,
                                                                        no_model_loads):
    out = tmp_path / "o"
    run(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=2, checkpointing_steps=2))

    def resume(**over):
        return recipe_error(capsys, t2i, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=4,
                                       checkpointing_steps=2, resume_from_checkpoint="latest", **over))
    msg = resume(learning_rate=1e-4)
    assert "checkpoint-2" in msg and "learning_rate 0.001 -> 0.0001" in msg
    assert "lora_alpha 4 -> 8" in resume(lora_alpha=8)
    assert "lr_scheduler constant -> cosine" in resume(lr_scheduler="cosine")
    assert "seed 0 -> 1" in resume(seed=1)
    (data / "img0.txt").write_text("a different caption")  # same images, one caption changed
    assert "data " in resume()


def test_a_new_run_into_a_folder_with_checkpoints_is_refused(tiny_model, tmp_path, data, capsys, no_model_loads):
    out = tmp_path / "o"
    run(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=2, checkpointing_steps=1))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=2))
    assert "holds checkpoints of an earlier run (checkpoint-2 and 1 more)" in msg
    assert "--resume_from_checkpoint latest" in msg
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_leftovers_of_killed_runs_are_cleaned_and_latest_skips_incomplete_ones(tiny_model, tmp_path, data):
    out = tmp_path / "o"
    run(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=4, checkpointing_steps=2,
                        validation_prompt="a red square", num_validation_images=1))
    # What kills at different moments leave behind: names with sdlora's temp marker ...
    (out / ".checkpoint-6.0123456789abcdef.sdlora-tmp").mkdir()
    (out / ".checkpoint-6.0123456789abcdef.sdlora-tmp" / "optimizer.pt").write_bytes(b"half")
    (out / ".README.md.00112233445566ff.sdlora-tmp").write_text("half a card")
    (out / "samples" / ".latest_0.png.aabbccddeeff0011.sdlora-tmp").write_bytes(b"png")
    # ... and what sdlora cannot prove it wrote (older versions' temp names too), which stays
    theirs = {".README.md.x8y9.tmp": "half a card?", ".tmpAb3dE9": "safetensors' temp file?", "notes.tmp": "mine",
              "checkpoint-7/unet_lora.safetensors": "partial?", "checkpoint-9/my-notes.txt": "mine"}
    for name, text in theirs.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    r = run(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=6, checkpointing_steps=2,
                            resume_from_checkpoint="latest"))
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == [".README.md.x8y9.tmp", ".sdlora-files.json", ".tmpAb3dE9", "README.md", "checkpoint-2",
                     "checkpoint-4", "checkpoint-6", "checkpoint-7", "checkpoint-9", "notes.tmp", "o.safetensors",
                     WEIGHTS, "samples", "sdlora-config.toml"], names
    assert not [p for p in (out / "samples").iterdir() if p.name.startswith(".")]
    assert all((out / name).read_text() == text for name, text in theirs.items())


def test_killed_run_resumed_equals_an_uninterrupted_one(tiny_model, tmp_path, data):
    common = dict(train_data_dir=data, max_train_steps=8, checkpointing_steps=2, gradient_accumulation_steps=2)
    run(T2I, fast_flags(tiny_model, tmp_path / "full", **common))
    out = tmp_path / "part"
    a = start(fast_flags(tiny_model, out, **dict(common, max_train_steps=10**6, checkpointing_steps=2)),
               tmp_path / "a.log")
    wait_for(lambda: (out / "checkpoint-4" / "state.json").exists(), "two checkpoints")
    a.send_signal(signal.SIGKILL)
    a.wait()
    # The killed run had max_train_steps 10**6 and a constant LR: the same schedule as 8 steps.
    r = run(T2I, fast_flags(tiny_model, out, resume_from_checkpoint="latest", **common))
    assert "resumed from" in r.stderr
    full, _ = read_lora(tmp_path / "full" / WEIGHTS)
    resumed, _ = read_lora(out / WEIGHTS)
    assert full.keys() == resumed.keys()
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6


# ---------------------------------------------------------------- damaged checkpoints

def _damage(ckpt, how):
    if how == "state_not_json":
        (ckpt / "state.json").write_text("{not json")
        return "state.json"
    if how == "state_missing_seed":
        (ckpt / "state.json").write_text(json.dumps({"global_step": 2}))
        return "state.json"
    if how == "truncated_weights":
        f = ckpt / "unet_lora.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        return "unet_lora.safetensors"
    if how == "optimizer_garbage":
        (ckpt / "optimizer.pt").write_bytes(b"this is not a torch file")
        return "optimizer.pt"
    if how == "rank_differs":
        f = ckpt / "unet_lora.safetensors"
        sd = load_file(str(f))
        save_file({k: (v[:2] if "lora_A" in k else v[:, :2]).contiguous() for k, v in sd.items()}, str(f))
        return "unet_lora.safetensors"
    raise ValueError(how)


@pytest.fixture(scope="module")
def trained_once(tiny_model, tmp_path_factory):
    """One short run with a checkpoint, copied by each damage case (a training run costs seconds)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    data, out = make_images(tmp / "d", n=4), tmp / "o"
    run(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=2, checkpointing_steps=2))
    return data, out


@pytest.mark.parametrize("how", ["state_not_json", "state_missing_seed", "truncated_weights", "optimizer_garbage",
                                 "rank_differs"])
def test_damaged_checkpoint_is_one_line_before_loading(tiny_model, tmp_path, trained_once, capsys, how, no_model_loads):
    data, template = trained_once
    out = tmp_path / "o"
    shutil.copytree(template, out)
    bad = _damage(out / "checkpoint-2", how)
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=4,
                                                resume_from_checkpoint="latest"))
    assert str(out / "checkpoint-2") in msg and bad in msg, msg


def test_target_modules_that_match_nothing_fail_before_loading(tiny_model, tmp_path, data, capsys, no_model_loads):
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, target_modules="to_q,to_qq"))
    assert "--target_modules to_qq: matches no layer" in msg and "to_out.0" in msg
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, target_modules="attn1"))
    assert "--target_modules attn1" in msg and "Attention" in msg


# ---------------------------------------------------------------- disk full, permissions, determinism

def _fail_writes_under(monkeypatch, fragment):
    real = sdlora.io.write_file

    def write(path, data, **kw):
        if fragment in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, **kw)
    monkeypatch.setattr(sdlora.io, "write_file", write)


def test_disk_full_mid_checkpoint_is_one_line_and_keeps_the_previous_one(tiny_model, tmp_path, data, capsys,
                                                                        monkeypatch):
    out = tmp_path / "o"
    _fail_writes_under(monkeypatch, ".checkpoint-4.")
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=6, checkpointing_steps=2))
    assert str(out / "checkpoint-4") in msg and "disk is full" in msg and "it needs" in msg, msg
    assert sorted(p.name for p in out.iterdir()) == [".sdlora-files.json", "checkpoint-2"]  # no temp, no half one
    assert json.loads((out / "checkpoint-2" / "state.json").read_text())["global_step"] == 2
    assert load_file(str(out / "checkpoint-2" / "unet_lora.safetensors"))


def test_disk_full_at_the_final_save_keeps_the_earlier_weights(tiny_model, tmp_path, data, capsys, monkeypatch):
    out = tmp_path / "o"
    run(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=1))
    before = (out / WEIGHTS).read_bytes()
    _fail_writes_under(monkeypatch, f".{WEIGHTS}.")
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=2, seed=5,
                                                overwrite_output_dir=True))
    assert str(out / WEIGHTS) in msg and "disk is full" in msg
    assert (out / WEIGHTS).read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(sdlora.io.TMP_SUFFIX)]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tiny_model, tmp_path, data, umask, mode):
    out = tmp_path / "o"
    cmd = [sys.executable, str(T2I), *fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=1,
                                                    checkpointing_steps=1)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, preexec_fn=lambda: os.umask(umask))
    assert r.returncode == 0, r.stderr[-2000:]
    for f in [out / WEIGHTS, out / "o.safetensors", out / "README.md", *(out / "checkpoint-1").iterdir()]:
        assert f.stat().st_mode & 0o777 == mode, (f, oct(f.stat().st_mode))
    assert (out / "checkpoint-1").stat().st_mode & 0o777 == 0o777 & ~umask


def test_identical_runs_write_identical_bytes(tiny_model, tmp_path, data):
    # Same settings, same output folder name (it is the LoRA's title), the date pinned as reproducible builds do.
    for name in ("a", "b"):
        run(T2I, fast_flags(tiny_model, tmp_path / name / "o", train_data_dir=data, max_train_steps=2,
                            checkpointing_steps=2, lora_alpha=8), SOURCE_DATE_EPOCH="1764028800")
    for f in (WEIGHTS, "o.safetensors", "checkpoint-2/unet_lora.safetensors"):
        assert (tmp_path / "a/o" / f).read_bytes() == (tmp_path / "b/o" / f).read_bytes(), f
    with safe_open(str(tmp_path / "a/o" / WEIGHTS), "pt") as h:
        assert h.metadata()["modelspec.date"] == "2025-11-25"


# ---------------------------------------------------------------- sharing, quiet logs

class FailingHfApi:
    def create_repo(self, repo_id, token=None, **kw):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, token=None, **kw):
        raise ConnectionError(f"upload refused for token {token}\nsecond line")


def test_failed_push_is_one_line_and_the_local_output_is_complete(tiny_model, tmp_path, data, capsys, monkeypatch):
    secret = "hf_SECRETtokenVALUE_0123456789"
    monkeypatch.setattr(sdlora.output.hub, "HfApi", FailingHfApi)
    out = tmp_path / "o"
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=1, push_to_hub=True,
                                  hub_token=secret, hub_model_id="me/lora"))
    assert "uploading to me/lora failed (ConnectionError" in msg and f"{out} is complete" in msg
    assert secret not in msg and "hf upload me/lora" in msg
    assert read_lora(out / WEIGHTS)[0] and (out / "README.md").exists()


def test_a_newcomers_run_is_quiet_but_real_warnings_show(tiny_model, tmp_path, data):
    (data / "broken.png").write_bytes(b"not an image")  # a real warning: this file is skipped
    out = tmp_path / "o"
    r = run(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=1, validation_prompt="a red square",
                            num_validation_images=1))
    assert "skipping" in r.stderr and "broken.png" in r.stderr
    for noise in ("requires torchvision", "Loading weights", "No LoRA keys"):
        assert noise not in r.stderr, noise
    g = subprocess.run([sys.executable, "-m", "sdlora.cli", "generate", "a red square", "--lora", str(out),
                        "--steps", "2", "--seed", "0", "--out", str(tmp_path / "png")],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert g.returncode == 0, g.stderr[-2000:]
    for noise in ("requires torchvision", "No LoRA keys"):
        assert noise not in g.stderr, noise
    # ... while plain diffusers does print it for the same UNet-only file (the filter is what hides it)
    plain = subprocess.run([sys.executable, "-c", (
        "from diffusers import StableDiffusionPipeline as P\n"
        f"p = P.from_pretrained({str(tiny_model)!r})\np.load_lora_weights({str(out)!r})")],
        capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert plain.returncode == 0 and "No LoRA keys associated to CLIPTextModel" in plain.stderr, plain.stderr[-2000:]


def test_a_diverged_run_stops_with_one_line_and_saves_nothing_broken(tiny_model, tmp_path, data, capsys):
    out = tmp_path / "o"
    msg = recipe_error(capsys, t2i, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=6,
                                                checkpointing_steps=1, learning_rate=1e30, max_grad_norm=0))
    assert "training diverged at step" in msg and "the last checkpoint is checkpoint-1" in msg
    assert sorted(p.name for p in out.iterdir()) == [".sdlora-files.json", "checkpoint-1"]  # nothing NaN saved
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint-1" / "unet_lora.safetensors")).values())
