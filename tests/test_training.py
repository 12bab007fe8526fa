"""Training behaviour: clipping, precision, DDP, text-encoder LoRA, hub upload, crash safety."""
import signal
import subprocess
import sys
import time

import torch
from conftest import make_images
from helpers import ROOT, T2I, accelerate_launch, env, fast_flags, read_lora, run

import sdlora.output.hub
from sdlora.recipes import text_to_image as t2i
from sdlora.cli.run import run as run_recipe


def _up_norm(path):
    sd, _ = read_lora(path)
    return torch.cat([v.flatten() for k, v in sd.items() if "lora.up" in k]).norm().item()


def test_max_grad_norm_clips_lora_gradients(tiny_model, tmp_path):
    # With eps >> sqrt(v), AdamW's first step is lr * g / eps: the update is the (clipped) gradient.
    # B starts at zero and A gets no gradient on step 1, so the saved up-weights *are* the update.
    data = make_images(tmp_path / "d", n=2)
    common = dict(train_data_dir=data, max_train_steps=1, learning_rate=1000.0, adam_epsilon=1000.0,
                  adam_weight_decay=0.0)
    run(T2I, fast_flags(tiny_model, tmp_path / "clip", max_grad_norm=1e-4, **common))
    run(T2I, fast_flags(tiny_model, tmp_path / "free", max_grad_norm=0, **common))
    clipped, free = _up_norm(tmp_path / "clip/pytorch_lora_weights.safetensors"), _up_norm(tmp_path / "free/pytorch_lora_weights.safetensors")
    assert free > 1e-3, free  # the raw gradient is far larger than the limit...
    assert abs(clipped - 1e-4) < 1e-6, clipped  # ...and the clipped update has norm max_grad_norm


def test_bf16_on_cpu_keeps_lora_params_fp32(tiny_model, tmp_path):
    data = make_images(tmp_path / "d", n=2)
    r = run(T2I, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, mixed_precision="bf16", max_train_steps=2))
    assert "LoRA parameters in float32, frozen weights in bfloat16 (mixed precision: bf16)" in r.stderr
    assert "precision: bf16 on the CPU" in r.stderr  # and whether this CPU computes it natively
    sd, meta = read_lora(tmp_path / "o/pytorch_lora_weights.safetensors")
    assert meta["ss_mixed_precision"] == "bf16" and all(torch.isfinite(v).all() for v in sd.values())


def test_accelerate_launch_precision_and_two_processes(tiny_model, tmp_path):
    """`accelerate launch --mixed_precision bf16 --num_processes 2`: DDP over gloo, one set of outputs."""
    data = make_images(tmp_path / "d", n=4)
    out = tmp_path / "o"
    cmd = accelerate_launch(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=2,
                                            checkpointing_steps=1, checkpoints_total_limit=1), mixed_precision="bf16")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 procs" in r.stderr and "frozen weights in bfloat16" in r.stderr
    assert r.stderr.count("saved " + str(out / "pytorch_lora_weights.safetensors")) == 1
    assert sorted(p.name for p in out.iterdir() if p.name[0] != ".") == [
        "README.md", "checkpoint-2", "o.safetensors", "pytorch_lora_weights.safetensors", "sdlora-config.toml"]


def test_text_encoder_lora_without_cache(tiny_model, tmp_path):
    """--train_text_encoder + --random_flip: nothing cached, both components saved and loadable."""
    from diffusers import StableDiffusionPipeline

    data = make_images(tmp_path / "d", n=2)
    r = run(T2I, fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, train_text_encoder=True, random_flip=True,
                            save_precision="fp16"))
    assert "cached nothing" in r.stderr
    sd, _ = read_lora(tmp_path / "o/pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in sd) and any(k.startswith("unet.") for k in sd)
    # the classic CLIP spelling, whatever the installed transformers calls the module (5.x: no text_model)
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in sd if k.startswith("text_encoder."))
    assert all(v.dtype == torch.float16 for v in sd.values())
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(str(tmp_path / "o"))
    assert any("lora_A" in n for n, _ in pipe.text_encoder.named_parameters())


class FakeHfApi:
    """Stands in for the Hub API only: records calls, resolves which files would be uploaded."""
    calls = []

    def create_repo(self, repo_id, token=None, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, token=None, allow_patterns=None, ignore_patterns=None, **kw):
        from pathlib import Path

        from huggingface_hub.utils import filter_repo_objects

        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        chosen = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        self.calls.append(("upload_folder", repo_id, token, sorted(chosen)))


def test_push_to_hub_uploads_only_results_and_never_writes_token(tiny_model, tmp_path, monkeypatch, capsys):
    secret = "hf_TESTTOKEN_do_not_leak_123"
    monkeypatch.setattr(sdlora.output.hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    data = make_images(tmp_path / "d", n=2)
    out = tmp_path / "o"
    argv = fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=2, checkpointing_steps=1,
                      push_to_hub=True, hub_token=secret, hub_model_id="me/my-lora", validation_prompt="a red square",
                      num_validation_images=1, report_to="tensorboard")
    assert run_recipe(t2i.parse_args(argv), t2i.make_recipe) == 0
    logs = capsys.readouterr()
    (create, repo, tok), (upload, repo2, tok2, files) = FakeHfApi.calls
    assert create == "create_repo" and repo == repo2 == "me/my-lora" and tok == tok2 == secret
    assert files == ["README.md", "o.safetensors", "pytorch_lora_weights.safetensors", "samples/latest_0.png"]
    assert "repo_id" not in files and (out / "checkpoint-1").exists() and (out / "logs").exists()
    assert secret not in logs.out + logs.err
    for p in out.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), f"token written to {p}"
    card = (out / "README.md").read_text()
    assert '"me/my-lora"' in card
    # a local base path is not a Hub id: the pushed card leaves base_model out of its front matter
    assert "base_model:" not in card.split("---")[1] and "base_model left out" in logs.err


def test_killed_run_never_damages_previous_output(tiny_model, tmp_path):
    data = make_images(tmp_path / "d", n=4)
    out = tmp_path / "o"
    run(T2I, fast_flags(tiny_model, out, train_data_dir=data, max_train_steps=1))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    # Second run into the same folder, killed mid-training (SIGKILL: no cleanup code runs).
    proc = subprocess.Popen([sys.executable, str(T2I), *fast_flags(tiny_model, out, train_data_dir=data,
                                                                      max_train_steps=100000, checkpointing_steps=3,
                                                                      overwrite_output_dir=True)],
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    deadline = time.time() + 300
    while not list(out.glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    # sdlora-config.toml is the settings of the run whose checkpoints the folder holds (what a flag-less resume
    # reads), so it is the killed run's; the LoRA files and card of the finished run are untouched
    assert b"max_train_steps = 100000" in after.pop("sdlora-config.toml")
    assert after == {k: v for k, v in before.items() if k != "sdlora-config.toml"}
    from safetensors import safe_open

    for ck in out.glob("checkpoint-*"):
        with safe_open(str(ck / "unet_lora.safetensors"), "pt") as f:  # every visible checkpoint is complete
            assert len(list(f.keys())) > 0
    # stray temp files may remain from the kill, but are hidden and never taken for results
    assert all(p.name.startswith(".") for p in out.iterdir() if "sdlora-tmp" in p.name)


def test_precision_note_says_why(monkeypatch):
    """The log's precision line: bf16 named native or emulated by the CPU's features; fp32 on a bf16 CPU advises bf16."""
    from sdlora import models

    monkeypatch.setattr(models, "native_bf16", lambda: "AVX512-BF16")
    assert models.precision_note("bf16", "cpu") == "bf16 on the CPU (AVX512-BF16 computes it natively)"
    assert "--mixed_precision bf16 trains" in models.precision_note(None, "cpu")
    monkeypatch.setattr(models, "native_bf16", lambda: None)
    assert "emulated" in models.precision_note("bf16", "cpu")
    assert models.precision_note("no", "cpu") == "fp32 on the CPU"


def test_fp32_chosen_on_purpose_gets_no_bf16_advice(tiny_model, tmp_path, capsys, monkeypatch):
    """--mixed_precision no is a choice: the log states fp32 without advising bf16 on every start, on a CPU where
    it would advise it to a run that chose nothing (accelerate's default)."""
    from sdlora import models

    monkeypatch.setattr(models, "native_bf16", lambda: "AVX512-BF16")
    assert "--mixed_precision bf16 trains about 2x faster" in models.precision_note("no", "cpu")  # not chosen
    data = make_images(tmp_path / "d", n=1)
    assert t2i.main(fast_flags(tiny_model, tmp_path / "o", train_data_dir=data, max_train_steps=1,
                               train_batch_size=1, mixed_precision="no")) == 0
    err = capsys.readouterr().err
    assert "precision: fp32 on the CPU; LoRA parameters in float32" in err and "2x faster" not in err, err[-3000:]


def test_compile_trains_the_same_lora(tiny_model, tmp_path, monkeypatch):
    """--compile runs the training steps through torch.compile (dynamo traces the peft-wrapped UNet) and saves the
    same LoRA, with the same keys, as an uncompiled run. The eager backend keeps dynamo's tracing but skips
    inductor's C++ build (minutes even for the tiny UNet on 2 cores), so the weights match exactly."""
    import functools

    import torch._dynamo

    from sdlora.recipes import text_to_image as t2i
    from sdlora.cli.flags import train_config
    from sdlora.training.loop import train

    data = make_images(tmp_path / "d", n=4)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    out = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        argv = fast_flags(tiny_model, tmp_path / f"o{compiled}", train_data_dir=data, max_train_steps=3,
                          compile=compiled)
        args = t2i.parse_args(argv)
        config = train_config(args)
        out[compiled] = read_lora(train(config, t2i.make_recipe(args, config)))[0]
        assert (torch._dynamo.utils.counters["frames"]["ok"] > 0) == compiled
    assert out[True].keys() == out[False].keys()
    assert all(torch.equal(out[True][k], out[False][k]) for k in out[False])


def test_dataloader_workers_with_random_flip_train_and_resume_exactly(tiny_model, tmp_path):
    """Workers decode and flip in other processes; each flip is still seeded by (seed, epoch, row), so the
    LoRA is the one a run without workers trains, and a resume with workers is exact."""
    data = make_images(tmp_path / "d", n=4)
    common = dict(train_data_dir=data, random_flip=True, max_train_steps=4)
    run(T2I, fast_flags(tiny_model, tmp_path / "w0", **common))
    run(T2I, fast_flags(tiny_model, tmp_path / "w2", dataloader_num_workers=2, **common))
    part = tmp_path / "part"
    run(T2I, fast_flags(tiny_model, part, dataloader_num_workers=2, **dict(common, max_train_steps=2,
                                                                          checkpointing_steps=2)))
    r = run(T2I, fast_flags(tiny_model, part, dataloader_num_workers=2, resume_from_checkpoint="latest", **common))
    assert "resumed from" in r.stderr and "cached VAE latents" not in r.stderr
    w0, w2, resumed = (read_lora(d / "pytorch_lora_weights.safetensors")[0] for d in (tmp_path / "w0", tmp_path / "w2", part))
    assert all(torch.equal(w0[k], w2[k]) for k in w0)
    assert max((w0[k] - resumed[k]).abs().max().item() for k in w0) <= 1e-6
