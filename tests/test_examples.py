"""The README's main command and the DreamBooth evaluation run end to end (tiny budgets)."""
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, env
from PIL import Image


def assert_printed_kohya_file_exists(stdout: str):
    """The summary names the kohya-layout file the run wrote (folder `lora`: <its parent>-lora.safetensors)."""
    (line,) = [x for x in stdout.splitlines() if "(the same LoRA for ComfyUI" in x]
    path = Path(line.split()[0])
    assert path.is_file() and path.name != "lora.safetensors", line


def test_quickstart_trains_and_writes_before_after(tmp_path):
    r = subprocess.run([sys.executable, "examples/quickstart.py", "--out", str(tmp_path), "--steps", "3",
                        "--per_prompt", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert "base_model:" in (tmp_path / "lora" / "README.md").read_text()
    assert_printed_kohya_file_exists(r.stdout)
    grid = Image.open(tmp_path / "before_after.png")
    assert grid.size == (8 * 32 * 4, 2 * 32 * 4)
    for line in ("in the new style (detector):", "right shape colour:", "right background colour:"):
        assert line in r.stdout, r.stdout
    for noise in ("requires torchvision", "No LoRA keys", "Loading weights"):  # a newcomer's run is quiet
        assert noise not in r.stderr, r.stderr[-3000:]


def test_quickstart_on_the_bundled_sd3(tmp_path):
    """--base sdlora-tiny-sd3: the same recipe on the SD3 base, LoRA on the image stream (quickstart.SD3_TARGETS), no
    min-SNR (a UNet loss option SD3 refuses)."""
    r = subprocess.run([sys.executable, "examples/quickstart.py", "--out", str(tmp_path), "--steps", "3",
                        "--per_prompt", "1", "--base", "sdlora-tiny-sd3"],
                       capture_output=True, text=True, cwd=ROOT, env=env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    command = r.stdout.splitlines()[0]
    assert "--target_modules attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,ff.net.0.proj,ff.net.2,norm1.linear" in \
        command and "--snr_gamma" not in command, command
    assert "| base model family | SD3 |" in (tmp_path / "lora" / "README.md").read_text()
    assert_printed_kohya_file_exists(r.stdout)
    assert Image.open(tmp_path / "before_after.png").size == (8 * 32 * 4, 2 * 32 * 4)
    assert "right shape colour:" in r.stdout, r.stdout


def test_dreambooth_quickstart_trains_and_writes_its_grid(tmp_path):
    r = subprocess.run([sys.executable, "examples/dreambooth_quickstart.py", "--out", str(tmp_path), "--steps", "2",
                        "--num_class_images", "2", "--per_prompt", "2"],
                       capture_output=True, text=True, cwd=ROOT, env=env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lora = tmp_path / "lora"
    from safetensors import safe_open

    with safe_open(lora / "pytorch_lora_weights.safetensors", "pt") as f:  # the recipe: UNet convs and text encoder
        keys = list(f.keys())
    assert any(k.startswith("text_encoder.") for k in keys) and any(".conv1.lora.down" in k for k in keys)
    card = (lora / "README.md").read_text()
    assert "instance_prompt: a sks square" in card and "| prior preservation | True |" in card
    assert "| instance captions | True |" in card
    assert len(list((tmp_path / "class-images").glob("*.png"))) == 2
    grid = Image.open(tmp_path / "dreambooth_before_after.png")
    assert grid.size == (8 * 32 * 4, 5 * 32 * 4)  # the photos, then base / LoRA rows of subject and class prompts
    for line in ("subject fidelity", "prompt fidelity", "class drift", "subject leak"):
        assert line in r.stdout, r.stdout
    assert_printed_kohya_file_exists(r.stdout)
    assert "lack the identifier" not in r.stderr  # every shipped caption names the subject
    assert "Loading weights" not in r.stderr


def test_eval_dreambooth_quick(tmp_path):
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, "examples/eval_dreambooth.py", "--quick", "--json", str(out),
                        "--work", str(tmp_path / "runs")], capture_output=True, text=True, cwd=ROOT, env=env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    res = json.loads(out.read_text())
    assert {"base", "without prior preservation", "with prior preservation"} <= set(res)
    for key in ("subject_fidelity", "prompt_fidelity", "class_drift", "subject_leak"):
        assert 0 <= res["with prior preservation"][key] <= 1
        assert len(res["without prior preservation"][f"{key}_per_seed"]) == 1
    assert res["base"]["class_drift"] == 0
    assert "| with prior preservation |" in r.stdout
