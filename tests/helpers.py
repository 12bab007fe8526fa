"""Run the training scripts the way a user does: as subprocesses, offline."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T2I = ROOT / "train_text_to_image_lora.py"
DREAMBOOTH = ROOT / "train_dreambooth_lora.py"


def env(**extra):
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1",
             OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    e.update(extra)
    return e


def fast_flags(model, out, **over):
    """Flags for a few-second run on the tiny model."""
    flags = {"pretrained_model_name_or_path": model, "output_dir": out, "resolution": 32,
             "train_batch_size": 2, "max_train_steps": 4, "seed": 0, "report_to": "none",
             "checkpointing_steps": 1000, "learning_rate": 1e-3}
    flags.update(over)
    argv = []
    for k, v in flags.items():
        if v is False or v is None:
            continue
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return argv


def free_port() -> int:
    """A TCP port nothing listens on now: two-process runs in parallel test workers must not share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script, argv, mixed_precision="no") -> list[str]:
    """The command of `accelerate launch --num_processes 2` (DDP over gloo on the CPU) running `script`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(script), *argv]


def run(script, argv, check=True, timeout=600, **env_extra):
    r = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env(**env_extra),
                       timeout=timeout, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"{script.name} exited {r.returncode}\nSTDERR:\n{r.stderr[-4000:]}")
    return r


def start(argv, log_path, script=T2I, **env_extra):
    """Start a training run in the background, its output going to `log_path`."""
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, str(script), *argv], stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=env(**env_extra), cwd=ROOT)


def wait_for(predicate, what, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def read_lora(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def front_matter(readme: Path) -> dict:
    """The model card's YAML front matter, parsed as the Hub parses it."""
    from huggingface_hub import metadata_load

    assert readme.read_text().startswith("---\n"), "model card has no YAML front matter"
    return metadata_load(readme) or {}


def recipe_error(capsys, recipe, argv) -> str:
    """Run a recipe module (sdlora.recipes.text_to_image / dreambooth) in-process; assert it exits 2
    with exactly one `error:` line and no traceback; return that line."""
    from sdlora.cli.run import run as run_recipe

    rc = run_recipe(recipe.parse_args(argv), recipe.make_recipe)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def lycoris_modules(file, pipe, monkeypatch) -> dict:
    """{lora_name: module} as LyCORIS' kohya-network loader (`create_network_from_weights`, the code kohya's tools
    and A1111's LyCORIS support share) builds them from `file` over `pipe`'s models."""
    import torch
    from lycoris import kohya

    # LyCORIS 4.1.3 builds its default training modules on construction and trips over diffusers'
    # time_embedding names ("duplicated lora name"); loading from weights discards those modules anyway.
    monkeypatch.setattr(kohya.LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])

    class ClassicCLIP(torch.nn.Module):  # the module tree kohya's tools and A1111 see: text_model.encoder…
        def __init__(self, te):
            super().__init__()
            self.text_model = te
    te = pipe.text_encoder if hasattr(pipe.text_encoder, "text_model") else ClassicCLIP(pipe.text_encoder)
    network, _ = kohya.create_network_from_weights(1.0, str(file), pipe.vae, te, pipe.unet, for_inference=True)
    return {m.lora_name: m for m in network.unet_loras + network.text_encoder_loras}
