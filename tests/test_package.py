"""The built wheel trains on its own: `sdlora train …` from an installed package, away from the checkout."""
import shutil
import subprocess
import sys

from helpers import ROOT, env, read_lora

SKIP = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "demo",
                              "outputs", "runs")


def test_wheel_installs_and_trains_from_another_directory(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)  # build from a copy: the checkout stays clean
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
                       capture_output=True, text=True, env=env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = wheels.glob("sdlora-*.whl")
    site = tmp_path / "site"  # the wheel alone; its dependencies come from this environment
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, env=env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    e = env(PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import sdlora, train_text_to_image_lora as t; "
                            "print(sdlora.__file__); print(t.__file__)"], capture_output=True, text=True, env=e,
                           cwd=work, timeout=120)
    assert where.returncode == 0 and all(line.startswith(str(site)) for line in where.stdout.split()), where

    data = work / "data"
    data.mkdir()
    for p in sorted((ROOT / "examples/data/pokemon").glob("000[0-3].png")):
        shutil.copy(p, data / p.name)
        (data / p.with_suffix(".txt").name).write_text("a red circle on a blue background")
    for recipe, flags in [("text-to-image", ["--train_data_dir", str(data)]),
                          ("dreambooth", ["--instance_data_dir", str(data), "--instance_prompt", "a sks circle"])]:
        out = work / recipe
        r = subprocess.run([sys.executable, "-m", "sdlora.cli", "train", recipe, "--pretrained_model_name_or_path",
                            "sdlora-tiny", *flags, "--resolution", "32", "--max_train_steps", "2", "--train_batch_size",
                            "2", "--report_to", "none", "--seed", "0", "--output_dir", str(out)],
                           capture_output=True, text=True, env=e, cwd=work, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        sd, meta = read_lora(out / "pytorch_lora_weights.safetensors")
        assert sd and meta["ss_steps"] == "2" and meta["ss_sd_model_name"] == "sdlora-tiny"
    r = subprocess.run([sys.executable, "-m", "sdlora.cli", "train", "text-to-image", "--help"], capture_output=True,
                       text=True, env=e, cwd=work, timeout=120)
    assert r.returncode == 0 and "--train_data_dir" in r.stdout and "--lora_alpha" in r.stdout
