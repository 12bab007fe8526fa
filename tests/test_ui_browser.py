"""`sdlora ui` in a real browser: headless Chromium (Debian's package) driven by Playwright against the UI on the
tiny model. Trains 20 steps from the form, watches the loss plot and a sample appear, generates with the trained
LoRA (before/after at one seed), and puts bad input through the form. Needs `pip install -e ".[test,ui]"
playwright` and /usr/bin/chromium; CI installs both and fails if this file is skipped. With SDLORA_UI_SCREENSHOTS
set to a folder, the screenshots of both tabs (the README's) are written there."""
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import PY, make_images

CHROMIUM = os.environ.get("SDLORA_CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not (importlib.util.find_spec("gradio") and importlib.util.find_spec("playwright") and Path(CHROMIUM).exists()),
    reason="needs the ui extra, playwright and Chromium (pip install -e '.[test,ui]' playwright; apt install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui(tmp_path):
    port = free_port()
    log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen([PY, "-m", "sdlora.cli", "ui", "--port", str(port)], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"))
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            assert proc.poll() is None, (tmp_path / "ui.log").read_text()
            time.sleep(0.25)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def page(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1366, "height": 768})  # a laptop screen
        page.goto(ui)
        page.wait_for_selector("#train_start")
        yield page
        browser.close()


def fill(page, elem: str, value):
    page.locator(f"#{elem}").locator("textarea, input").first.fill(str(value))


def in_view(page, *elems):
    """The elements are on screen with the page scrolled to the top, at 1366×768 and at 1920×1080."""
    from playwright.sync_api import expect

    for size in ({"width": 1920, "height": 1080}, {"width": 1366, "height": 768}):
        page.set_viewport_size(size)
        page.evaluate("window.scrollTo(0, 0)")
        for e in elems:
            expect(page.locator(f"#{e}")).to_be_in_viewport(ratio=1)


def shot(page, name: str):
    folder = os.environ.get("SDLORA_UI_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def test_train_and_generate_in_the_browser(page, tmp_path):
    """On the bundled sdlora-tiny, the base model the form starts with."""
    from PIL import Image
    from playwright.sync_api import expect

    status, notice = page.locator("#train_status"), page.locator("#train_notice")
    out = tmp_path / "my-lora"
    expect(page.locator("#train_base textarea, #train_base input").first).to_have_value("sdlora-tiny")
    fill(page, "train_output", out)
    fill(page, "train_resolution", 32)

    # Bad data folders: the script's one-line error, and no output folder left behind.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.bin").write_bytes(b"\x00\x01")
    for data, said in [(tmp_path / "nope", "not a folder"), (tmp_path / "notes", "no readable image found")]:
        fill(page, "train_data", data)
        page.click("#train_start")
        expect(status).to_contain_text(f"error: --train_data_dir {data}: {said}", timeout=60000)
        assert len(status.inner_text().strip().splitlines()) == 1 and not out.exists()
    in_view(page, "train_start", "train_stop", "train_status")

    data = make_images(tmp_path / "data", n=4)
    Image.new("RGB", (40, 24), "red").save(data / "wide.png")
    (data / "wide.txt").write_text("a red rectangle")
    (data / "broken.png").write_bytes(b"not a png")
    fill(page, "train_data", data)
    page.click("#train_preview")
    expect(page.locator("#train_summary")).to_contain_text("5 image(s) at 32 px", timeout=60000)
    expect(page.locator("#train_summary")).to_contain_text("1 file(s) skipped")
    assert page.locator("#train_images img").count() == 5
    expect(page.locator("#train_skipped")).to_contain_text("broken.png")

    fill(page, "train_max_train_steps", 20)
    fill(page, "train_sample_every_n_steps", 10)
    fill(page, "train_seed", 0)
    fill(page, "train_prompts", "a red square --w 32 --h 32 --s 4 --d 1")
    page.click("#train_start")
    expect(notice).to_contain_text("started: train_text_to_image_lora.py", timeout=30000)
    expect(page.locator("#train_start")).to_be_disabled()  # while the run goes
    expect(status).to_contain_text("finished: step 20/20", timeout=180000)
    expect(page.locator("#train_start")).to_be_enabled()
    expect(page.locator("#train_samples img").first).to_be_visible(timeout=10000)
    expect(page.locator("#train_loss svg.marks")).to_be_visible(timeout=10000)  # the chart (Vega, as SVG)
    assert (out / "pytorch_lora_weights.safetensors").exists() and (out / "samples" / "step000020_00.png").exists()
    page.wait_for_timeout(1000)
    shot(page, "ui-train.png")
    fill(page, "train_output", tmp_path / "new-run")  # a folder without a run: not the last run's curve
    expect(status).to_have_text("no run yet", timeout=10000)
    expect(page.locator("#train_loss svg.marks")).to_have_count(0, timeout=10000)
    expect(page.locator("#train_samples img")).to_have_count(0)

    page.get_by_role("tab", name="Generate").click()
    fill(page, "gen_lora1", out)
    fill(page, "gen_prompt", "a red square")
    fill(page, "gen_steps", 6)
    fill(page, "gen_width", 32)
    fill(page, "gen_height", 32)
    fill(page, "gen_out", tmp_path / "images")
    page.click("#gen_go")
    g_status = page.locator("#gen_status")
    expect(g_status).to_contain_text("wrote", timeout=120000)
    before, after = sorted((tmp_path / "images").glob("*.png"))
    assert page.locator("#gen_gallery img").count() >= 2
    import json

    meta = [json.loads(Image.open(p).text["sdlora"]) for p in (before, after)]
    assert meta[0]["seed"] == meta[1]["seed"] == 0 and meta[0]["loras"] == [] and meta[1]["loras"]
    assert Image.open(before).tobytes() != Image.open(after).tobytes()  # the LoRA changed the image, same seed
    in_view(page, "gen_go", "gen_status", "gen_gallery")
    page.wait_for_timeout(500)
    shot(page, "ui-generate.png")

    # A LoRA for another model (its layers have other shapes): one line, nothing written.
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "pytorch_lora_weights.safetensors")
    wrong = {k: torch.zeros(v.shape[0], v.shape[1] + 8) if "lora.down" in k else v for k, v in weights.items()}
    (tmp_path / "other").mkdir()
    save_file(wrong, tmp_path / "other" / "pytorch_lora_weights.safetensors")
    fill(page, "gen_lora1", tmp_path / "other")
    page.click("#gen_go")
    expect(g_status).to_contain_text("error: ", timeout=60000)
    assert len(g_status.inner_text().strip().splitlines()) == 1
    assert sorted((tmp_path / "images").glob("*.png")) == [before, after]
    shutil.rmtree(tmp_path / "other")

    # Tools: inspect the trained LoRA, convert it to the ComfyUI / A1111 (kohya) file.
    page.get_by_role("tab", name="Tools").click()
    fill(page, "tool_file", out)
    page.get_by_role("button", name="Inspect").click()
    result = page.locator("#tool_result")
    expect(result).to_contain_text("base model:     sdlora-tiny", timeout=30000)
    fill(page, "tool_out", tmp_path / "comfy.safetensors")
    page.get_by_role("button", name="Convert").click()
    expect(result).to_contain_text("converted diffusers -> kohya", timeout=30000)
    assert (tmp_path / "comfy.safetensors").exists()
    page.get_by_role("button", name="Convert").click()  # again: the file is there now
    expect(result).to_contain_text(f"error: {tmp_path / 'comfy.safetensors'} already exists", timeout=30000)


def value(page, elem: str) -> str:
    return page.locator(f"#{elem}").locator("textarea, input").first.input_value()


def test_config_file_form_survives_a_reload_and_resumes_exactly(page, tmp_path):
    """Issue #33: Load config -> the form shows it -> Start -> reload the page mid-run -> the form still shows the
    run's settings -> Stop -> Resume finishes at the same weights as the same config run uninterrupted."""
    import torch
    from playwright.sync_api import expect

    from helpers import read_lora
    from sdlora.recipes import text_to_image as t2i

    STEPS = 400
    data, out, ref = make_images(tmp_path / "data", n=4), tmp_path / "run", tmp_path / "ref"
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\npretrained_model_name_or_path = "sdlora-tiny"\n[data]\ntrain_data_dir = "{data}"\n'
                   f'resolution = 32\n[training]\noutput_dir = "{out}"\nmax_train_steps = {STEPS}\nseed = 3\n'
                   'learning_rate = 1e-3\nlr_scheduler = "cosine"\nlr_warmup_steps = 0\ncheckpointing_steps = 1000\n'
                   "rank = 4\nlora_alpha = 2\nreport_to = \"none\"\n")
    status, notice = page.locator("#train_status"), page.locator("#train_notice")
    fill(page, "train_config_path", cfg)
    page.click("#train_load")
    expect(notice).to_contain_text(f"loaded {cfg}", timeout=30000)
    shown = {"train_data": str(data), "train_output": str(out), "train_max_train_steps": str(STEPS), "train_seed": "3",
             "train_resolution": "32", "train_lora_alpha": "2"}
    page.get_by_role("button", name="Advanced").click()  # the labelled advanced fields
    for elem, v in shown.items():
        assert value(page, elem) == v, elem
    page.click("#train_start")
    expect(notice).to_contain_text("started: train_text_to_image_lora.py", timeout=30000)
    # mid-run (the run is long enough for a reload on a quiet CPU: ~0.05 s/step; any step before the last)
    expect(status).to_contain_text(re.compile(rf"running: step \d+/{STEPS}"), timeout=180000)

    page.reload()
    page.wait_for_selector("#train_start")
    expect(page.locator("#train_output textarea, #train_output input").first).to_have_value(str(out), timeout=30000)
    page.get_by_role("button", name="Advanced").click()
    for elem, v in shown.items():
        assert value(page, elem) == v, elem
    page.click("#train_stop")
    expect(status).to_contain_text("stopped", timeout=120000)
    assert not (out / "pytorch_lora_weights.safetensors").exists() and list(out.glob("checkpoint-*"))
    page.click("#train_resume")
    expect(status).to_contain_text(f"finished: step {STEPS}/{STEPS}", timeout=300000)

    assert t2i.main(["--config_file", str(cfg), "--output_dir", str(ref)]) == 0
    a, b = read_lora(out / "pytorch_lora_weights.safetensors")[0], read_lora(ref / "pytorch_lora_weights.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dataset_tab_captions_a_folder_and_the_preview_reads_an_edit(page, tmp_path):
    """Caption a folder with a tiny random-weight BLIP, edit one caption in the table, save, and preview it."""
    from playwright.sync_api import expect

    from sdlora.caption import random_models

    model = random_models.blip(tmp_path / "blip")
    data = make_images(tmp_path / "data", n=3, captions=False)
    page.get_by_role("tab", name="Dataset").click()
    fill(page, "ds_dir", data)
    fill(page, "ds_model", model)
    fill(page, "ds_prefix", "sks")
    page.click("#ds_caption")
    status = page.locator("#ds_status")
    expect(status).to_contain_text("wrote 3 caption(s)", timeout=180000)
    assert all((data / f"img{i}.txt").read_text().startswith("sks, ") for i in range(3))
    expect(page.locator("#ds_gallery img")).to_have_count(3)
    expect(page.locator("#ds_freq")).to_contain_text("sks")

    page.locator('#ds_table [data-testid="cell-0-1"]').dblclick()  # row 0 (img0.png), the caption column
    editor = page.locator("#ds_table textarea, #ds_table input:not([type=file])").first
    editor.fill("sks, a hand-written caption")
    editor.press("Enter")
    page.click("#ds_save")
    expect(status).to_contain_text("saved 1 caption(s)", timeout=30000)
    assert (data / "img0.txt").read_text() == "sks, a hand-written caption\n"
    assert (data / "img1.txt").read_text().startswith("sks, ")

    page.get_by_role("tab", name="Train").click()
    fill(page, "train_data", data)
    fill(page, "train_resolution", 32)
    page.click("#train_preview")
    expect(page.locator("#train_summary")).to_contain_text("3 image(s) at 32 px", timeout=60000)
    expect(page.locator("#train_images")).to_contain_text("sks, a hand-written caption")
