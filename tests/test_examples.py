"""The README's main command and the DreamBooth evaluation run end to end (tiny budgets)."""
import subprocess
import sys

from helpers import ROOT, env
from PIL import Image


def test_quickstart_trains_and_writes_before_after(tmp_path):
    r = subprocess.run([sys.executable, "examples/quickstart.py", "--out", str(tmp_path), "--steps", "3",
                        "--per_prompt", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert "base_model:" in (tmp_path / "lora" / "README.md").read_text()
    grid = Image.open(tmp_path / "before_after.png")
    assert grid.size == (8 * 32 * 4, 2 * 32 * 4)
    for line in ("in the new style (detector):", "right shape colour:", "right background colour:"):
        assert line in r.stdout, r.stdout
    for noise in ("requires torchvision", "No LoRA keys", "Loading weights"):  # a newcomer's run is quiet
        assert noise not in r.stderr, r.stderr[-3000:]


def test_eval_dreambooth_quick(tmp_path):
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, "examples/eval_dreambooth.py", "--quick", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    res = json.loads(out.read_text())
    assert {"base", "without prior preservation", "with prior preservation"} <= set(res)
    assert 0 <= res["with prior preservation"]["drift"] < 1
    assert "| with prior preservation |" in r.stdout
