"""Shared fixtures: a real tiny SD pipeline built locally, and small image sets. No downloads."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def pytest_addoption(parser, pluginmanager):
    """pyproject's addopts run the suite in parallel (`--numprocesses auto --dist loadfile`: pytest-xdist, from the
    test extra). Where pytest-xdist is missing (an older venv, `-p no:xdist`), accept those two flags and run in one
    process."""
    if not pluginmanager.has_plugin("xdist"):
        parser.addoption("--numprocesses", dest="numprocesses", default=None, help="(needs pytest-xdist)")
        parser.addoption("--dist", dest="dist", default="no", help="(needs pytest-xdist)")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A StableDiffusionPipeline folder with random weights (tiny SD1.x architecture)."""
    from sdlora.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def sd2_model(tmp_path_factory) -> Path:
    """A StableDiffusionPipeline folder with the SD 2.x layout and a v-prediction scheduler (sd2-tiny)."""
    from sdlora.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "sd2-tiny", arch="sd2-tiny")


@pytest.fixture(scope="session")
def sdxl_model(tmp_path_factory) -> Path:
    """A StableDiffusionXLPipeline folder (sdxl-tiny: two text encoders, text_time conditioning)."""
    from sdlora.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "sdxl-tiny", arch="sdxl-tiny")


def make_images(folder: Path, n: int = 4, size: int = 32, captions: bool = True, fmt: str = "png"):
    """n coloured-square images with kohya-style .txt captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    colours = [(255, 0, 0), (0, 0, 255), (0, 160, 0), (255, 255, 0), (128, 0, 128), (0, 200, 200)]
    names = ["red", "blue", "green", "yellow", "purple", "cyan"]
    for i in range(n):
        img = Image.new("RGB", (size, size), colours[(i + 1) % 6])
        img.paste(colours[i % 6], (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
        img.save(folder / f"img{i}.{fmt}")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a {names[i % 6]} square on a {names[(i + 1) % 6]} background")
    return folder


def forbid_model_loads(monkeypatch):
    """From here on, fail the test if any model weights are loaded (or class images generated)."""
    import sdlora.data.class_images
    import sdlora.models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the problem was reported")
    for name in ("load_tokenizer", "load_text_encoder", "load_vae", "load_unet", "load_noise_scheduler"):
        monkeypatch.setattr(sdlora.models, name, boom)
    monkeypatch.setattr(sdlora.data.class_images, "generate", boom)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any model weights are loaded (or class images generated) before the error."""
    forbid_model_loads(monkeypatch)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_images(tmp_path / "data")


sys.path.insert(0, str(ROOT))  # the top-level scripts are importable for in-process checks
