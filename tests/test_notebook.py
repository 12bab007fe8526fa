"""The example notebook runs as it is, top to bottom, offline on the bundled `sdlora-tiny`: its defaults, with only
the LoRA's folder given (the README's command 1 writes demo/lora; a clone that has not run it has none), and its
output is the notebook's own (no third-party warnings)."""
import re
from pathlib import Path

import pytest

import sdlora
from sdlora.testing import demo_lora

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "load_lora.ipynb"
TINY = Path(sdlora.__file__).parent / "assets" / "tiny-sd"  # what the notebook's default `sdlora-tiny` loads


def test_notebook_runs_offline_on_the_tiny_model_with_its_defaults(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    demo_lora(tmp_path / "lora", base=TINY, strength=1.0)
    for key in ("SDLORA_BASE", "SDLORA_PROMPT", "SDLORA_GUIDANCE", "SDLORA_STEPS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"SDLORA_LORA": tmp_path / "lora", "OMP_NUM_THREADS": 1, "HF_HUB_OFFLINE": 1}.items():
        monkeypatch.setenv(key, str(value))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stderr = [o.text for o in outputs if o.get("name") == "stderr"]
    assert not stderr, stderr  # quiet: no warnings or progress bars
    assert any("image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    assert int(re.search(r"max pixel difference (\d+)", text).group(1)) > 0
