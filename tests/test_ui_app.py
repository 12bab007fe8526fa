"""`sdlora ui` without a browser: real HTTP against `sdlora ui`'s server (which requests it answers, what its login
page shows a stranger), and the Train and Tools callbacks in-process on real folders. Needs the ui extra (Gradio);
CI runs this file in its ui step, with the browser test."""
import http.client
import importlib.util
import json
import socket
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from conftest import make_images

pytestmark = pytest.mark.skipif(not importlib.util.find_spec("gradio"),
                                reason="needs the ui extra (pip install -e '.[test,ui]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, headers=None, body=None):
    """(status, headers with lower-case names, text); `headers` may name any Host, as a browser's would."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body, {"Host": f"127.0.0.1:{port}", **(headers or {})})
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode(errors="replace")
    conn.close()
    return out


def lora_file(path: Path) -> Path:
    """A small real LoRA file (diffusers keys) the Tools can read and convert."""
    import torch
    from safetensors.torch import save_file

    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 8),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(8, 4)}, path)
    return path


@pytest.fixture(scope="module")
def uis(tmp_path_factory):
    """`sdlora ui`'s server as the command builds it, in this process (one Gradio import for the file): the default
    one (127.0.0.1, no login) and one with a login."""
    import threading

    import uvicorn

    from sdlora.ui.app import server

    servers = {}
    for name, auth in {"open": None, "login": [("ann", "secret")]}.items():
        port = free_port()
        s = uvicorn.Server(uvicorn.Config(server("127.0.0.1", port, auth), host="127.0.0.1", port=port,
                                          log_level="warning"))
        threading.Thread(target=s.run, daemon=True).start()
        servers[name] = port, s
    for port, s in servers.values():
        for _ in range(600):
            if s.started:
                break
            time.sleep(0.05)
    yield {name: port for name, (port, _) in servers.items()}
    for _, s in servers.values():
        s.should_exit = True


def test_requests_for_other_host_names_or_from_other_sites_are_refused(uis, tmp_path):
    """DNS rebinding: a page at evil.example points its name at 127.0.0.1 and posts to the UI as if it were its own
    site. Refused with a 403 before anything runs, as are another site's posts and preflights by the UI's own
    address; the UI's own page makes the same call and it runs."""
    port = uis["open"]
    src, out = lora_file(tmp_path / "in.safetensors"), tmp_path / "out.safetensors"
    body = json.dumps({"data": [str(src), str(out), "kohya"]})
    call = "/gradio_api/call/tool_convert"
    js = {"Content-Type": "application/json"}
    for headers in ({"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"},
                    {"Host": f"evil.example:{port}"},
                    {"Origin": f"http://evil.example:{port}"},
                    {"Origin": "null"}):
        status, got, text = request(port, "POST", call, {**js, **headers}, body)
        assert status == 403 and "sdlora ui:" in text, (headers, status, text)
        assert "access-control-allow-origin" not in got
    status, got, _ = request(port, "OPTIONS", call, {"Origin": f"http://evil.example:{port}",
                                                  "Access-Control-Request-Method": "POST"})
    assert status == 403 and "access-control-allow-origin" not in got
    time.sleep(1)
    assert not out.exists()

    own = f"http://localhost:{port}"
    status, got, text = request(port, "POST", call, {**js, "Host": f"localhost:{port}", "Origin": own}, body)
    assert status == 200 and got["access-control-allow-origin"] == own
    status, _, text = request(port, "GET", f"{call}/{json.loads(text)['event_id']}", {"Host": f"localhost:{port}"})
    assert "converted diffusers -> kohya" in text and out.exists()


def test_login_page_tells_a_stranger_nothing_of_the_api(uis):
    port = uis["login"]
    status, _, page = request(port, "GET", "/?all_endpoints=true")
    assert status == 200 and "window.gradio_api_info" in page
    assert "tool_convert" not in page and "do_start" not in page and "train_start" not in page
    status, got, _ = request(port, "POST", "/login", {"Content-Type": "application/x-www-form-urlencoded"},
                          urllib.parse.urlencode({"username": "ann", "password": "secret"}))
    assert status == 200
    cookie = "; ".join(c.split(";")[0] for c in got["set-cookie"].split(", ") if "=" in c.split(";")[0])
    status, _, page = request(port, "GET", "/", {"Cookie": cookie})
    assert status == 200 and "train_start" in page  # logged in: the app itself


@pytest.fixture
def served_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "served"))


def test_poll_serves_only_the_runs_own_samples_and_clears_another_runs_curve(served_dir, tmp_path):
    """A link in a run's samples/ folder (to any file of the user's) is never copied where the page can fetch it;
    a folder without a run shows no loss curve, not the one shown before; Start is on when no run goes."""
    from sdlora.ui import files
    from sdlora.ui.train_tab import poll

    run = tmp_path / "run"
    make_images(run / "samples", n=1)
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's private file")
    (run / "samples" / "leak.png").symlink_to(secret)
    (run / "samples" / "dir.png").symlink_to(tmp_path)
    (run / "logs").mkdir()
    # what the worker writes (sdlora/ui/worker.py): two steps of a run that has ended
    (run / "logs" / "progress.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"event": "start", "pid": 1}, {"step": 1, "loss": 0.5, "max_steps": 2, "s_per_step": 0.1, "first": True},
        {"step": 2, "loss": 0.4, "max_steps": 2, "s_per_step": 0.1}, {"event": "end", "rc": 0}]) + "\n")

    line, plot, gallery, shown, start, resume, stop = poll(str(run), {})
    assert line.startswith("finished: step 2/2") and list(plot["loss"]) == [0.5, 0.4]
    assert [name for _, name in gallery] == ["img0.png"]
    served = [p for p in (tmp_path / "served").rglob("*") if p.is_file()]
    assert len(served) == 1 and all(p.read_bytes() != secret.read_bytes() for p in served)
    assert start["interactive"] and resume["interactive"] and not stop["interactive"]
    with pytest.raises(OSError):
        files.served(run / "samples" / "leak.png")

    line, plot, gallery, shown, *_ = poll(str(tmp_path / "new-run"), shown)
    assert line == "no run yet" and plot is None and gallery == []
    line, plot, *_ = poll(str(run), {})
    assert list(plot["loss"]) == [0.5, 0.4]
    with open(run / "logs" / "progress.jsonl", "a") as f:  # a new run in the same folder, loading its models
        f.write(json.dumps({"event": "start", "pid": 1, "command": ["text-to-image", "--seed", "1"]}) + "\n")
    line, plot, *_ = poll(str(run), {"rows": [(1, 0.5, "loss"), (2, 0.4, "loss")]})
    assert plot is None


def form(data, out, extra=""):
    """do_start's arguments after `resume`: the Train form with the recipe's own defaults (blank main flags)."""
    from sdlora.ui.train_tab import MAIN_FLAGS

    return ["text-to-image", "sdlora-tiny", "", str(data), "", str(out), "lora", "default", extra, "",
            *[""] * len(MAIN_FLAGS)]


def test_start_checks_the_form_then_turns_itself_off_while_the_run_goes(served_dir, tmp_path):
    from sdlora.ui import jobs
    from sdlora.ui.train_tab import do_start, do_stop, poll

    data, out = make_images(tmp_path / "data"), tmp_path / "out"
    notice, *buttons = do_start(False, *form(data, out, "--resolution abc"))
    assert notice.startswith("error: argument --resolution: invalid int value") and "error: error" not in notice
    # A folder typed in "more flags" would run where the page does not look, out of Stop's reach.
    notice, *_ = do_start(False, *form(data, out, f"--output_dir {tmp_path / 'elsewhere'}"))
    assert notice.startswith("error: more flags: --output_dir") and "Output folder" in notice
    notice, *_ = do_start(False, *form(data, out, "--logging_dir mine"))
    assert notice.startswith("error: more flags: --logging_dir")
    assert not (tmp_path / "elsewhere").exists() and jobs.folder_key(out) not in jobs.launched

    notice, start, resume, stop = do_start(False, *form(data, out, "--max_train_steps 1"))
    assert notice.startswith("started: ") and not start["interactive"] and not resume["interactive"]
    assert stop["interactive"]
    line, _, _, _, start, _, stop = poll(str(out), {})
    assert line.startswith("starting") and not start["interactive"] and stop["interactive"]
    assert do_stop(str(out)).startswith("stopping the run")
    t = time.time()
    while line.startswith("starting") and time.time() - t < 60:
        time.sleep(0.1)
        line, _, _, _, start, _, stop = poll(str(out), {})
    assert not line.startswith("starting") and start["interactive"] and not stop["interactive"]


def test_tools_refuse_an_output_that_exists(tmp_path):
    from sdlora.ui.tools_tab import tool_convert, tool_resize
    src, out = lora_file(tmp_path / "in.safetensors"), tmp_path / "kohya.safetensors"
    assert tool_convert(str(src), str(out), "kohya").startswith("converted diffusers -> kohya")
    before = out.read_bytes()
    said = tool_convert(str(src), str(out), "diffusers")
    assert said == (f"error: {out} already exists: the UI writes only new files; choose a new output path "
                    "(or delete it first)")
    assert out.read_bytes() == before
    assert tool_resize(str(src), str(out), 2).startswith(f"error: {out} already exists")
    (tmp_path / "empty").mkdir()  # a new, empty folder is a new output
    assert tool_convert(str(src), str(tmp_path / "empty"), "kohya").startswith("converted")


def test_dreambooth_class_images_go_where_the_command_line_puts_them(tmp_path):
    """The UI passes no class folder of its own: the recipe's default applies (as for `sdlora train dreambooth`),
    and one given under more flags is passed on."""
    from sdlora.recipes import RECIPES
    from sdlora.ui.train_tab import MAIN_FLAGS, checked_flags

    data, out = make_images(tmp_path / "data", n=2), tmp_path / "out"
    form = ["sdlora-tiny", "", str(data), "a photo of sks square", str(out), "lora", "default"]
    prior = "--with_prior_preservation --class_prompt 'a square'"
    flags = checked_flags("dreambooth", False, str(out), *form, prior, *[""] * len(MAIN_FLAGS))
    assert "--class_data_dir" not in flags
    cli = RECIPES["dreambooth"].parse_args(["--pretrained_model_name_or_path", "sdlora-tiny", "--instance_data_dir",
                                            str(data), "--instance_prompt", "a photo of sks square", "--output_dir",
                                            str(out), "--with_prior_preservation", "--class_prompt", "a square"])
    assert RECIPES["dreambooth"].parse_args(flags).class_data_dir == cli.class_data_dir is None
    mine = str(tmp_path / "classes")
    flags = checked_flags("dreambooth", False, str(out), *form, f"{prior} --class_data_dir {mine}",
                          *[""] * len(MAIN_FLAGS))
    assert RECIPES["dreambooth"].parse_args(flags).class_data_dir == mine
    assert not out.exists()


def test_dreambooth_preview_shows_the_captions_the_run_trains_on(tmp_path):
    """The preview's rows are the recipe's own: with --instance_captions each photo shows its own caption (the
    instance prompt where it has none), without it every photo shows the instance prompt."""
    from sdlora.recipes import RECIPES
    from sdlora.ui.preview import preview
    from sdlora.ui.train_tab import MAIN_FLAGS, checked_flags

    data, out = make_images(tmp_path / "data", n=3), tmp_path / "out"
    (data / "img2.txt").unlink()
    form = ["sdlora-tiny", "", str(data), "a photo of sks square", str(out), "lora", "default"]
    shown = {}
    for extra in ("--instance_captions", ""):
        flags = checked_flags("dreambooth", False, str(out), *form, extra, *[""] * len(MAIN_FLAGS))
        args = RECIPES["dreambooth"].parse_args(flags)
        shown[extra] = [(Path(f).name, caption) for f, caption in preview("dreambooth", args).images]
        assert [(Path(r.image).name, r.caption) for r in RECIPES["dreambooth"].rows(args)] == shown[extra]
    assert shown["--instance_captions"] == [("img0.png", "a red square on a blue background"),
                                           ("img1.png", "a blue square on a green background"),
                                           ("img2.png", "a photo of sks square")]
    assert shown[""] == [(f"img{i}.png", "a photo of sks square") for i in range(3)]
    assert not out.exists()


def test_generate_guidance_starts_at_the_bases_own():
    """The Generate tab's Guidance follows the base, as `sdlora generate` without --guidance does: the bundled
    model's measured guidance, else diffusers' usual 7.5."""
    from sdlora import models
    from sdlora.ui.generate_tab import guidance_for

    assert guidance_for("sdlora-tiny") == models.BUNDLED_GUIDANCE["sdlora-tiny"] != models.GUIDANCE
    assert guidance_for("org/some-model") == guidance_for("") == models.GUIDANCE


def test_generate_guidance_on_an_sd3_folder_is_its_pipelines_own(tmp_path):
    """An SD3 base folder starts the slider at StableDiffusion3Pipeline's own default, as `sdlora generate` does."""
    import inspect
    import json

    from diffusers import StableDiffusion3Pipeline

    from sdlora import models
    from sdlora.ui.generate_tab import guidance_for

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    own = inspect.signature(StableDiffusion3Pipeline.__call__).parameters["guidance_scale"].default
    assert guidance_for(str(tmp_path)) == own != models.GUIDANCE


def test_dataset_tab_bulk_edits_then_saves_only_changed_captions(tmp_path):
    from sdlora.ui.dataset_tab import do_bulk, do_load, do_save

    data = make_images(tmp_path / "data", n=3, captions=False)
    (data / "img0.txt").write_text("sks, red, old_tag\n")
    (data / "img1.txt").write_text("blue, old_tag\n")
    (data / "notes.bin").write_bytes(b"\x00")
    gallery, table, freq, status = do_load(str(data), False)
    assert len(gallery) == 3 and table[2] == ["img2.png", ""] and ["old_tag", 2] in freq
    assert status.startswith("3 image(s), 1 file(s) skipped: notes.bin: not an image")
    _, table, freq, status = do_bulk(str(data), table, "photo", "red", "old_tag -> new tag")
    assert table == [["img0.png", "sks, new tag, photo"], ["img1.png", "blue, new tag, photo"], ["img2.png", "photo"]]
    assert (data / "img0.txt").read_text() == "sks, red, old_tag\n"  # not saved yet
    table[1][1] = "blue, new tag, photo"  # unchanged from the bulk edit, so saved like the others
    before = (data / "img1.txt").stat().st_mtime_ns
    _, table, freq, status = do_save(str(data), False, table)
    assert status == "saved 3 caption(s)" and ["photo", 3] in freq
    assert (data / "img0.txt").read_text() == "sks, new tag, photo\n" and (data / "img2.txt").read_text() == "photo\n"
    _, _, _, status = do_save(str(data), False, table)
    assert status == "saved 0 caption(s)" and (data / "img1.txt").stat().st_mtime_ns > before
    *_, status = do_save(str(data), False, [["../outside.png", "x"]])
    assert status.startswith("error: ../outside.png: not an image of") and not (tmp_path / "outside.txt").exists()


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """The bundled tiny model as one original-layout .safetensors checkpoint (`sdlora make-tiny --single-file`'s
    layout), and the folder whose configs it loads with."""
    from sdlora.bases import ldm

    return ldm.write("sdlora-tiny", tmp_path_factory.mktemp("single") / "tiny.safetensors")[0], "sdlora-tiny"


def test_train_form_passes_a_single_file_and_its_base_config_as_the_command_line_does(single_file, tmp_path):
    from sdlora.recipes import RECIPES
    from sdlora.ui import config_form
    from sdlora.ui.train_tab import MAIN_FLAGS, checked_flags, do_preview, do_save_config

    path, configs = single_file
    data, out = make_images(tmp_path / "data", n=2), tmp_path / "out"
    form = [str(path), f" {configs} ", str(data), "", str(out), "lora", "default", ""]
    flags = checked_flags("text-to-image", False, str(out), *form, *[""] * len(MAIN_FLAGS))
    args = RECIPES["text-to-image"].parse_args(flags)
    cli = RECIPES["text-to-image"].parse_args(["--pretrained_model_name_or_path", str(path), "--base_config", configs,
                                               "--train_data_dir", str(data), "--output_dir", str(out)])
    assert (args.pretrained_model_name_or_path, args.base_config) == (cli.pretrained_model_name_or_path,
                                                                      cli.base_config) == (str(path), configs)
    blank = checked_flags("text-to-image", False, str(out), form[0], "", *form[2:], *[""] * len(MAIN_FLAGS))
    assert "--base_config" not in blank  # blank: left to the script, as leaving the flag out
    *_, summary = do_preview("text-to-image", *form, *[""] * len(MAIN_FLAGS))
    assert not summary.startswith("error") and not out.exists()
    # the form restored from a run's flags (Load config, a reload) shows it in its box, not under "more flags"
    shown = dict(zip(config_form.FIELDS, config_form.form_values("text-to-image", args, MAIN_FLAGS)))
    assert (shown["base"], shown["base_config"]) == (str(path), configs) and "--base_config" not in shown["extra"]
    # and Save config, then Load config (the TOML holds every setting, the SD3 ones too)
    said = do_save_config(str(tmp_path / "run.toml"), "text-to-image", *form, *[""] * len(MAIN_FLAGS))
    assert said.startswith("saved"), said
    loaded = dict(zip(config_form.FIELDS, config_form.load(str(tmp_path / "run.toml"), "text-to-image", MAIN_FLAGS)))
    assert {k: loaded[k] for k in ("base", "base_config", "extra")} == {k: shown[k] for k in ("base", "base_config",
                                                                                           "extra")}


def test_generate_from_a_single_file_draws_the_folders_image(single_file, tmp_path, monkeypatch):
    from PIL import Image

    from sdlora.ui import generate_tab

    monkeypatch.setattr(generate_tab, "served", str)
    path, configs = single_file
    drawn = {}
    for name, base, base_config in (("file", str(path), configs), ("folder", configs, "")):
        _, files, status = generate_tab.do_generate(base, base_config, "a red square", "", 3, 2, 5.0, 32, 32, "dpm++",
                                                    "off", str(tmp_path / name), *[""] * (2 * generate_tab.LORA_SLOTS))
        assert status.startswith("wrote"), status
        drawn[name] = np.asarray(Image.open(files[0]))
    assert np.array_equal(drawn["file"], drawn["folder"])
    _, _, status = generate_tab.do_generate(configs, configs, "a red square", "", 3, 2, 5.0, 32, 32, "dpm++", "off",
                                            str(tmp_path / "x"), *[""] * (2 * generate_tab.LORA_SLOTS))
    assert status.startswith("error: base_config is for single-file checkpoints"), status


def test_tools_extract_takes_a_single_file_base_with_its_configs(single_file, tmp_path):
    from sdlora import models
    from sdlora.cli import main
    from sdlora.lora import formats
    from sdlora.testing import demo_lora
    from sdlora.ui.tools_tab import tool_extract

    path, configs = single_file
    tuned = tmp_path / "tuned"  # the base with a LoRA baked in
    lora = demo_lora(tmp_path / "lora", base=models.resolve_base(configs))
    assert main(["fuse", "--base", configs, "--lora", str(lora), "--out", str(tuned)]) == 0
    said = tool_extract(str(path), str(tuned), configs, str(tmp_path / "x.safetensors"), 2, "diffusers")
    assert said.splitlines()[-1].startswith("extracted") and formats.load_lora(tmp_path / "x.safetensors").modules
    said = tool_extract(str(path), str(tuned), configs, str(tmp_path / "x.safetensors"), 2, "diffusers")
    assert said.startswith("error:") and "already exists" in said


def test_advanced_fields_carry_the_optimizer_its_arguments_ema_clip_skip_and_loraplus_both_ways(tmp_path):
    """The Train tab's advanced fields become the recipe's own flags, which reach the run's settings and the
    optimizer's keyword arguments; parsed flags fill them back (a reload, Load config): the optimizer by its kohya
    name, its --optimizer_args items, EMA and its decay, clip skip, LoRA+'s ratio."""
    import shlex

    from sdlora.cli.flags import train_config
    from sdlora.recipes import RECIPES
    from sdlora.training import optimizers
    from sdlora.ui import config_form
    from sdlora.ui.train_tab import MAIN_FLAGS, do_preview

    assert "Prodigy" in config_form.OPTIMIZERS and "AdamW" in config_form.OPTIMIZERS
    fields = {"lr_scheduler": "cosine", "lora_alpha": "", "text_encoder_lr": "", "clip_skip": "2",
              "loraplus_lr_ratio": "16", "optimizer_args": "d_coef=2 decouple=False 'betas=(0.9, 0.99)'",
              "ema_decay": "0.999"}
    assert list(fields) == list(config_form.ADVANCED)
    flags = config_form.advanced_flags(*fields.values(), "Prodigy", True)
    assert flags == ["--lr_scheduler", "cosine", "--clip_skip", "2", "--loraplus_lr_ratio", "16", "--optimizer_args",
                     "d_coef=2", "decouple=False", "betas=(0.9, 0.99)", "--ema_decay", "0.999", "--optimizer",
                     "Prodigy", "--use_ema"]
    assert config_form.advanced_flags(*[""] * len(fields), "AdamW", False) == []
    args = RECIPES["text-to-image"].parser().parse_args(
        ["--pretrained_model_name_or_path", "sdlora-tiny", "--train_data_dir", "data", *flags])
    config = train_config(args)
    assert (config.use_ema, config.ema_decay, config.loraplus_lr_ratio, config.clip_skip) == (True, 0.999, 16, 2)
    kw = optimizers.keywords(config, optimizers.kind_of(config.optimizer))
    assert (kw["d_coef"], kw["decouple"], kw["betas"]) == (2, False, (0.9, 0.99))  # over --prodigy_decouple's True
    values = config_form.form_values("text-to-image", args, [])
    n = len(config_form.FIELDS)
    shown = dict(zip(config_form.ADVANCED, values[n:n + len(fields)]))
    assert shlex.split(shown.pop("optimizer_args")) == shlex.split(fields.pop("optimizer_args"))
    assert shown == fields and values[n + len(config_form.ADVANCED):][:2] == ["Prodigy", True]
    extra = values[config_form.FIELDS.index("extra")]
    assert not {"--optimizer", "--optimizer_args", "--use_ema", "--ema_decay"} & set(shlex.split(extra))
    # a field the shell cannot split is one line, before anything runs
    data = make_images(tmp_path / "data", n=1)
    form = ["sdlora-tiny", "", str(data), "", str(tmp_path / "out"), "lora", "default", ""]
    advanced = [*[""] * 5, "d_coef='2", "", "Prodigy", False, ""]
    *_, summary = do_preview("text-to-image", *form, *[""] * len(MAIN_FLAGS), *advanced)
    assert summary.startswith("error: Optimizer arguments (--optimizer_args): No closing quotation"), summary
