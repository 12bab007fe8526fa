"""The example notebook runs top to bottom on a tiny local model and shows an image the LoRA changed."""
import re
from pathlib import Path

import pytest

from sdlora.testing import demo_lora

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "load_lora.ipynb"


def test_notebook_loads_the_lora_and_shows_images(tiny_model, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    demo_lora(tmp_path / "lora", base=tiny_model, strength=1.0)
    for key, value in {"SDLORA_LORA": tmp_path / "lora", "SDLORA_BASE": tiny_model, "SDLORA_STEPS": 3,
                       "OMP_NUM_THREADS": 1, "HF_HUB_OFFLINE": 1}.items():
        monkeypatch.setenv(key, str(value))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    assert int(re.search(r"max pixel difference (\d+)", text).group(1)) > 0
