"""The Gradio app behind `sdlora ui`: Train, Generate and Tools tabs over the same recipes, loader and tools the
command line uses. Every action's problem shows as the scripts' one-line `error: …`; files are written only into
the output folders named in the form."""
from __future__ import annotations

import contextlib
import io
import os
import secrets
import shlex
import shutil
import stat
import tempfile
import threading
from pathlib import Path

import gradio as gr

from .. import pipeline
from ..cli import main as cli_main
from ..errors import UserError
from ..lora import formats
from ..recipes import RECIPES
from . import jobs
from .preview import preview

LORA_SLOTS = 4
# The main flags on the form; each starts at the selected recipe's own default (None: blank, the script decides).
MAIN_FLAGS = ["resolution", "max_train_steps", "num_train_epochs", "learning_rate", "rank", "train_batch_size",
              "seed", "checkpointing_steps", "validation_split", "sample_every_n_steps"]
DATA_FLAG = {"text-to-image": "--train_data_dir", "dreambooth": "--instance_data_dir"}
THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def _recipe(name: str):
    return RECIPES[name]


def recipe_defaults(name: str) -> dict:
    """The recipe's own defaults (what its parser gives when only the required flags are passed)."""
    need = ["--pretrained_model_name_or_path", "x", DATA_FLAG[name], "x"]
    if name == "dreambooth":
        need += ["--instance_prompt", "x"]
    return vars(_recipe(name).parse_args(need))


def recipe_help(name: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        _recipe(name).parse_args(["--help"])
    return out.getvalue()


def train_flags(recipe, base, data_dir, instance_prompt, output_dir, lora_type, mixed_precision, extra, *main) -> list:
    """The form as the recipe's command-line flags (blank fields are left to the script)."""
    if not str(base or "").strip():
        raise UserError("--pretrained_model_name_or_path: give a base model (sdlora-tiny, a folder or a Hub id)")
    if not str(data_dir or "").strip():
        raise UserError(f"{DATA_FLAG[recipe]}: give the folder of training images")
    if not str(output_dir or "").strip():
        raise UserError("--output_dir: give the folder the run writes to")
    flags = ["--pretrained_model_name_or_path", base.strip(), DATA_FLAG[recipe], data_dir.strip(),
             "--output_dir", output_dir.strip(), "--lora_type", lora_type]
    if recipe == "dreambooth":
        flags += ["--instance_prompt", instance_prompt or ""]
    if mixed_precision and mixed_precision != "default":
        flags += ["--mixed_precision", mixed_precision]
    for name, value in zip(MAIN_FLAGS, main):
        if str(value if value is not None else "").strip():  # the recipe's argparse checks the value
            flags += [f"--{name}", str(value).strip()]
    try:
        more = shlex.split(extra or "")
    except ValueError as e:
        raise UserError(f"more flags: {e}; check the quotes") from None
    if recipe == "dreambooth" and "--with_prior_preservation" in more and "--class_data_dir" not in more:
        # the script's default sits beside the output folder; the UI keeps everything inside it
        more += ["--class_data_dir", f"{output_dir.strip()}/class-images"]
    return flags + more


def _error(e: Exception) -> str:
    return f"error: {e}"


def _served(path) -> str:
    """A copy of `path` in Gradio's own temp folder, which is what the page may fetch: Gradio serves only that
    (and the working directory), while data and output folders can be anywhere. Byte for byte, so a downloaded
    PNG keeps its parameters. Only a regular file that is not a link: a link someone put in a run's folder could
    point at any of the user's files."""
    from gradio.utils import get_upload_folder

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with open(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{path}: not a regular file")
        os.makedirs(get_upload_folder(), exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=get_upload_folder()))
        with open(folder / Path(path).name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return str(folder / Path(path).name)


def _thumbnail(path, size: int = 256):
    from PIL import Image

    with Image.open(path) as im:
        im.thumbnail((size, size))
        return im.convert("RGB")


# ---------------------------------------------------------------- Train tab callbacks

def do_preview(recipe, base, data_dir, instance_prompt, output_dir, lora_type, mixed_precision, extra, *main):
    try:
        flags = _flags_for(recipe, False, output_dir, base, data_dir, instance_prompt, output_dir, lora_type,
                           mixed_precision, extra, *main)
        p = preview(recipe, _parse(recipe, flags))
    except UserError as e:
        return [], [], [], _error(e)
    return [(_thumbnail(f), c) for f, c in p.images], [list(b) for b in p.buckets], [list(s) for s in p.skipped], p.summary


def _parse(recipe: str, flags: list) -> object:
    """The recipe's own argparse; its usage errors become one line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return _recipe(recipe).parse_args(flags)
    except SystemExit:
        line = jobs.one_line_error(err.getvalue().splitlines()) or err.getvalue().strip()
        raise UserError(line.removeprefix("error: ")) from None  # shown as `error: …`, like every other error


def _flags_for(recipe, resume, output_dir, *form) -> list:
    """The form as flags, checked by the recipe's own parser before any process starts."""
    flags = train_flags(recipe, *form)
    if resume:
        flags += ["--resume_from_checkpoint", "latest"]
    args = _parse(recipe, flags)  # a usage error shows at once
    # The UI finds a run by its Output folder and follows it in <folder>/logs: a folder from "more flags" would
    # run where the page does not look (and Stop could not reach it).
    if Path(args.output_dir).expanduser().absolute() != Path(output_dir.strip()).expanduser().absolute():
        raise UserError(f"more flags: --output_dir {args.output_dir}: the run's folder is the Output folder field "
                        f"({output_dir.strip()}); set it there")
    default = recipe_defaults(recipe)["logging_dir"]
    if args.logging_dir != default:
        raise UserError(f"more flags: --logging_dir {args.logging_dir}: the UI follows a run in its Output folder's "
                        f"{default}/; leave the flag out")
    return flags


def do_start(resume, recipe, base, data_dir, instance_prompt, output_dir, lora_type, mixed_precision, extra, prompts,
             *main):
    """What Start (or Resume) did, and the buttons: Start and Resume off while the run goes, Stop on."""
    try:
        flags = _flags_for(recipe, resume, output_dir, base, data_dir, instance_prompt, output_dir, lora_type,
                           mixed_precision, extra, *main)
        job = jobs.start(recipe, flags, output_dir.strip(), prompts)
    except UserError as e:
        return _error(e), *_buttons(None)
    return "started: " + jobs.shown(job.command), *_buttons(True)


def _buttons(running):
    """Start, Resume and Stop as they fit a run going (True), not going (False) or unchanged (None)."""
    if running is None:
        return gr.skip(), gr.skip(), gr.skip()
    return gr.update(interactive=not running), gr.update(interactive=not running), gr.update(interactive=running)


def do_stop(output_dir):
    try:
        return jobs.stop(str(output_dir or "").strip())
    except UserError as e:
        return _error(e)


def poll(output_dir, shown):
    """The run's status line, loss plot and newest samples (plot and gallery only when they changed, and cleared for
    a folder without a run), what the page now shows, and the buttons."""
    import pandas as pd

    if not str(output_dir or "").strip():
        return "", gr.skip(), gr.skip(), shown, *_buttons(None)
    st = jobs.state(output_dir.strip())
    rows = [(s, v, "loss") for s, v in st.loss] + [(s, v, "validation loss") for s, v in st.val_loss]
    samples = [str(p) for p in st.samples]
    # Typed columns, and no frame until there is a point: the chart keeps the axis types of the first frame it gets,
    # and an empty frame's columns would make them categorical. (A column named "value" draws nothing.) None clears
    # the chart: a new run, a failed one, or another folder shows no other run's curve.
    plot = gr.skip() if rows == shown.get("rows") else None if not rows else \
        pd.DataFrame(rows, columns=["step", "loss", "curve"]).astype({"step": int, "loss": float, "curve": str})
    gallery = gr.skip() if samples == shown.get("samples") else [x for x in map(_served_sample, samples) if x]
    return st.line(), plot, gallery, {"rows": rows, "samples": samples}, *_buttons(st.running or st.starting)


def _served_sample(path):
    try:
        return _served(path), Path(path).name
    except (OSError, UserError):
        return None  # gone, or replaced by a link since the folder was read


def last_output_dir():
    """The folder of the run this UI started last (so a reopened page shows it), else the form's default."""
    folder = jobs.latest()
    return str(folder) if folder else gr.skip()


# ---------------------------------------------------------------- Generate tab

_pipes: dict = {}
_pipe_lock = threading.Lock()  # one generation at a time per pipeline: adapters are per-pipeline state


def _base_pipe(base: str):
    if base not in _pipes:
        _pipes.clear()  # one base in memory at a time
        _pipes[base] = pipeline.load_pipeline((), base=base)
    return _pipes[base]


def do_generate(base, prompt, negative, seed, steps, guidance, width, height, scheduler, mode, out, *slots):
    """Images into `out`, each with its parameters embedded; with LoRAs 'before/after', the base image at the same
    seed first. Returns (gallery, files, status)."""
    try:
        if not str(out or "").strip():
            raise UserError("output folder: give the folder the images are written to")
        if not str(prompt or "").strip():
            raise UserError("prompt: write what to draw")
        specs = [(p.strip(), float(w)) for p, w in zip(slots[::2], slots[1::2]) if str(p or "").strip()]
        read = [(formats.load_lora(p), w) for p, w in specs]  # a bad file fails here, before any model loads
        base = str(base or "").strip() or pipeline.base_from(read)
        seed = int(seed) if seed is not None and seed >= 0 else secrets.randbelow(2**31)
        w, h = (int(v) if v else None for v in (width, height))  # 0 or blank: the model's own size
        with _pipe_lock:
            pipe = _base_pipe(base)
            pipeline.set_scheduler(pipe, scheduler)
            for name in list(pipe.__dict__.get("sdlora_adapters", {})):
                pipe.delete_adapters(name)
                pipe.sdlora_adapters.pop(name)
            pipeline.add_loras(pipe, read)
            paths, captions = [], []
            runs = [("base", False), ("with LoRAs", True)] if mode == "before/after" and read else \
                [("base", False)] if mode == "off" or not read else [("with LoRAs", True)]
            for label, on in runs:
                (pipe.enable_lora if on else pipe.disable_lora)() if read else None
                images = pipeline.generate(pipe, prompt, negative or None, seed, int(steps), float(guidance), w, h)
                paths += pipeline.write_images(pipe, images, out.strip(), prompt, negative or None, seed, int(steps),
                                               float(guidance), scheduler, loras=None if on else [])
                captions.append(f"{label} · seed {seed}")
            if read:
                pipe.enable_lora()
    except UserError as e:
        return gr.skip(), gr.skip(), _error(e)
    served = [_served(p) for p in paths]
    return list(zip(served, captions)), served, "wrote " + ", ".join(map(str, paths))


# ---------------------------------------------------------------- Tools tab

def run_tool(*argv) -> str:
    """An `sdlora` tool command in-process: what it prints, or its one-line error."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            cli_main([str(a) for a in argv if a is not None and a != ""])
        except SystemExit:
            pass
    return out.getvalue().strip()


def tool_inspect(file):
    return run_tool("inspect", (file or "").strip())


def _new_output(out) -> str | None:
    """The one-line refusal of an output that is already there (a file, or a folder with files in it): the Tools
    tab writes new files only, and says so rather than replacing one silently."""
    p = Path(str(out or "").strip()).expanduser()
    if str(out or "").strip() and (p.is_symlink() or (p.exists() and not (p.is_dir() and not any(p.iterdir())))):
        return (f"error: {str(out).strip()} already exists: the UI writes only new files; choose a new output path "
                "(or delete it first)")
    return None


def tool_convert(file, out, to):
    return _new_output(out) or run_tool("convert", (file or "").strip(), (out or "").strip(), "--to", to)


def tool_resize(file, out, rank):
    return _new_output(out) or run_tool("resize", (file or "").strip(), (out or "").strip(), "--rank", int(rank or 0))


def tool_merge(files, out, rank):
    items = [line.strip() for line in (files or "").splitlines() if line.strip()]
    return _new_output(out) or run_tool("merge", *items, (out or "").strip(), *(["--rank", int(rank)] if rank else []))


# ---------------------------------------------------------------- layout

def build() -> gr.Blocks:
    """Each tab in two columns: the form on the left; the buttons, the run's status and the results on the right,
    at the top, so they are in view without scrolling on a laptop screen (1366×768)."""
    t2i = recipe_defaults("text-to-image")
    with gr.Blocks(title="sdlora") as demo:
        gr.Markdown("## sdlora: train and use Stable Diffusion LoRAs")
        with gr.Tab("Train", id="train"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    with gr.Row():
                        base = gr.Textbox("sdlora-tiny", label="Base model", info="sdlora-tiny (bundled), a local "
                                          "diffusers folder or a Hub id", elem_id="train_base")
                        recipe = gr.Radio(list(RECIPES), value="text-to-image", label="Recipe", elem_id="train_recipe")
                    with gr.Row():
                        data_dir = gr.Textbox(label="Data folder", info="images with .txt captions or metadata.jsonl "
                                              "(DreamBooth: the subject's photos)", elem_id="train_data")
                        instance_prompt = gr.Textbox(label="Instance prompt (DreamBooth)",
                                                     placeholder="a photo of sks dog", visible=False,
                                                     elem_id="train_instance_prompt")
                        output_dir = gr.Textbox("lora-output", label="Output folder", info="everything the run "
                                                "writes goes here", elem_id="train_output")
                    with gr.Row():
                        lora_type = gr.Dropdown(["lora", "dora", "loha", "lokr", "adalora"], value="lora",
                                                label="LoRA type", min_width=100)
                        mixed_precision = gr.Dropdown(["default", "no", "fp16", "bf16"], value="default",
                                                      label="Mixed precision", min_width=100)
                        main = [_flag_box(n, t2i) for n in MAIN_FLAGS[:2]]
                    for row in (MAIN_FLAGS[2:6], MAIN_FLAGS[6:]):
                        with gr.Row():
                            main += [_flag_box(n, t2i) for n in row]
                    prompts = gr.Textbox(label="Sample prompts", lines=2, elem_id="train_prompts",
                                         info="one per line, with kohya's options (--n negative, --s steps, --l "
                                         "guidance, --w/--h size, --d seed); sampled every sample_every_n_steps, "
                                         "and at the end")
                    with gr.Accordion("All flags", open=False):
                        extra = gr.Textbox(label="More flags", elem_id="train_extra",
                                           placeholder="--random_flip --lr_scheduler cosine --train_text_encoder")
                        flag_help = gr.Code(recipe_help("text-to-image"), label="The recipe's flags", language=None)
                    preview_btn = gr.Button("Preview data", elem_id="train_preview")
                    summary = gr.Markdown(elem_id="train_summary")
                    images = gr.Gallery(label="Images and captions", columns=8, height=220, elem_id="train_images")
                    with gr.Row():
                        bucket_table = gr.Dataframe(headers=["bucket", "images"], label="Buckets", interactive=False)
                        skipped = gr.Dataframe(headers=["file", "why it is skipped"], label="Skipped files",
                                               interactive=False, elem_id="train_skipped")
                with gr.Column(scale=2):
                    with gr.Row():
                        start = gr.Button("Start", variant="primary", elem_id="train_start", min_width=80)
                        stop = gr.Button("Stop", elem_id="train_stop", interactive=False, min_width=80)
                        resume = gr.Button("Resume", elem_id="train_resume", min_width=80)
                    status = gr.Markdown(elem_id="train_status")  # live
                    notice = gr.Markdown(elem_id="train_notice")  # what a button did
                    plot = gr.LinePlot(x="step", y="loss", color="curve", label="Loss", elem_id="train_loss",
                                       height=240)
                    samples = gr.Gallery(label="Samples (newest first)", columns=4, height=240,
                                         elem_id="train_samples")
            shown = gr.State({})
            timer = gr.Timer(1.0)

        form = [recipe, base, data_dir, instance_prompt, output_dir, lora_type, mixed_precision, extra]
        buttons = [start, resume, stop]

        def on_recipe(name):
            d = recipe_defaults(name)
            return [gr.update(visible=name == "dreambooth"), recipe_help(name)] + [_shown(d[n]) for n in MAIN_FLAGS]

        recipe.change(on_recipe, recipe, [instance_prompt, flag_help, *main])
        preview_btn.click(do_preview, [*form, *main], [images, bucket_table, skipped, summary])
        start.click(lambda *a: do_start(False, *a), [*form, prompts, *main], [notice, *buttons])
        resume.click(lambda *a: do_start(True, *a), [*form, prompts, *main], [notice, *buttons])
        stop.click(do_stop, output_dir, notice)
        timer.tick(poll, [output_dir, shown], [status, plot, samples, shown, *buttons], show_progress="hidden")
        demo.load(last_output_dir, None, output_dir)

        with gr.Tab("Generate", id="generate"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    with gr.Row():
                        g_base = gr.Textbox("sdlora-tiny", label="Base model", info="blank: the first LoRA's base "
                                            "model", elem_id="gen_base")
                        g_out = gr.Textbox("outputs", label="Output folder", elem_id="gen_out")
                    g_prompt = gr.Textbox(label="Prompt", elem_id="gen_prompt")
                    g_negative = gr.Textbox(label="Negative prompt", elem_id="gen_negative")
                    slots = []
                    for i in range(LORA_SLOTS):
                        with gr.Row():
                            slots.append(gr.Textbox(label=f"LoRA {i + 1}", placeholder="a LoRA folder, .safetensors "
                                                    "file or Hub id", elem_id=f"gen_lora{i + 1}", scale=4))
                            slots.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="weight",
                                                   elem_id=f"gen_weight{i + 1}"))
                    with gr.Row():
                        g_seed = gr.Number(0, label="Seed (-1: random)", precision=0, elem_id="gen_seed", min_width=120)
                        g_steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="gen_steps")
                        g_guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance", elem_id="gen_guidance")
                    with gr.Row():
                        g_width = gr.Number(None, label="Width (blank: the model's)", precision=0,
                                            elem_id="gen_width", min_width=120)
                        g_height = gr.Number(None, label="Height (blank: the model's)", precision=0,
                                             elem_id="gen_height", min_width=120)
                        g_sched = gr.Dropdown([k for k in pipeline.SCHEDULERS if k != "keep"], value="dpm++",
                                              label="Scheduler", min_width=120)
                        g_mode = gr.Radio(["on", "off", "before/after"], value="before/after", label="LoRAs",
                                          elem_id="gen_mode")
                with gr.Column(scale=2):
                    g_go = gr.Button("Generate", variant="primary", elem_id="gen_go")
                    g_status = gr.Markdown(elem_id="gen_status")
                    g_gallery = gr.Gallery(label="Images", columns=2, height=300, elem_id="gen_gallery")
                    g_files = gr.File(label="Download (PNG with its parameters)", file_count="multiple",
                                      elem_id="gen_files")
        g_go.click(do_generate, [g_base, g_prompt, g_negative, g_seed, g_steps, g_guidance, g_width, g_height,
                                 g_sched, g_mode, g_out, *slots], [g_gallery, g_files, g_status])

        with gr.Tab("Tools", id="tools"):
            t_file = gr.Textbox(label="LoRA file or folder", elem_id="tool_file")
            t_out = gr.Textbox(label="Output file or folder (a new one: the UI replaces nothing)", elem_id="tool_out")
            with gr.Row():
                t_to = gr.Dropdown(list(formats.FORMATS), value="kohya", label="Convert to (kohya: ComfyUI/A1111)")
                t_rank = gr.Number(None, label="Rank (resize; merge: optional SVD rank)", precision=0)
            t_merge = gr.Textbox(label="Merge: LoRAs with weights, one per line (path:weight)", lines=3)
            with gr.Row():
                b_inspect, b_convert = gr.Button("Inspect"), gr.Button("Convert")
                b_resize, b_merge = gr.Button("Resize"), gr.Button("Merge")
            t_result = gr.Code(label="Result", language=None, elem_id="tool_result")
        b_inspect.click(tool_inspect, t_file, t_result)
        b_convert.click(tool_convert, [t_file, t_out, t_to], t_result)
        b_resize.click(tool_resize, [t_file, t_out, t_rank], t_result)
        b_merge.click(tool_merge, [t_merge, t_out, t_rank], t_result)
    for fn in demo.fns.values():
        # The page calls its functions by index; none is an API: no description of them to anyone, the login page
        # included (Gradio embeds the API description in every page it serves).
        fn.api_visibility = "private"
    return demo


def server(host: str, port: int, auth=None, allowed_hosts=()):
    """The UI as an ASGI app for uvicorn: Gradio mounted at /, inside the Host/Origin check (sdlora/ui/guard.py),
    which has to be the outermost layer: Gradio's own CORS layer answers preflight requests itself."""
    from fastapi import FastAPI

    from .guard import Allowed, HostGuard

    allowed = Allowed(host, port, list(allowed_hosts))  # a bad --allowed-host fails before the UI is built
    app = gr.mount_gradio_app(FastAPI(), build(), path="/", server_name=host, server_port=port, auth=auth or None,
                              theme=theme(), footer_links=["gradio", "settings"])
    return HostGuard(app, allowed)


def _shown(default) -> str:
    return "" if default is None else f"{default:g}" if isinstance(default, float) else str(default)


def _flag_box(name: str, defaults: dict):
    """A main flag as text: blank leaves it to the script (as leaving the flag out would)."""
    return gr.Textbox(_shown(defaults[name]), label=f"--{name}", placeholder="script default", max_lines=1,
                      elem_id=f"train_{name}", min_width=100)


def theme():
    return gr.themes.Default(**THEME_FONTS)  # system fonts: the page loads nothing from the internet
