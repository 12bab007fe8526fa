"""The Train tab: the recipes' main flags as a form (each starting at the recipe's own default), a data preview,
and Start / Stop / Resume of a run in its own process (jobs.py), followed through its output folder."""
from __future__ import annotations

import shlex
from pathlib import Path

import gradio as gr

from ..errors import UserError
from ..recipes import RECIPES
from . import jobs
from .files import served_sample, thumbnail
from .preview import preview

# The main flags on the form; each starts at the selected recipe's own default (None: blank, the script decides).
MAIN_FLAGS = ["resolution", "max_train_steps", "num_train_epochs", "learning_rate", "rank", "train_batch_size",
              "seed", "checkpointing_steps", "validation_split", "sample_every_n_steps",
              # the optimizer, its main arguments, LoRA+ and EMA (training/optimizers.py, ema.py)
              "optimizer", "optimizer_args", "loraplus_lr_ratio", "use_ema", "ema_decay"]
SWITCHES = {"use_ema"}  # checkboxes: on adds the flag
OPTIMIZER_NAMES = ["AdamW", "Prodigy", "Adafactor", "Lion", "AdamWScheduleFree", "RAdamScheduleFree", "CAME",
                   "SGDNesterov", "AdamW8bit", "PagedAdamW8bit", "Lion8bit"]


def recipe_defaults(name: str) -> dict:
    """The recipe's own defaults of the main flags and --logging_dir, from its parser."""
    p = RECIPES[name].parser()
    return {dest: p.get_default(dest) for dest in [*MAIN_FLAGS, "logging_dir"]}


def recipe_help(name: str) -> str:
    return RECIPES[name].parser().format_help()


def _usage_error(message: str):
    raise UserError(message)  # shown as `error: …`, like every other error


def parse_flags(recipe: str, flags: list):
    """The recipe's own parser on the form's flags; a usage error is a UserError (the script would print it and
    exit)."""
    p = RECIPES[recipe].parser()
    p.error = _usage_error
    return p.parse_args(flags)


def train_flags(recipe, base, data_dir, instance_prompt, output_dir, lora_type, mixed_precision, extra, *main) -> list:
    """The form as the recipe's command-line flags (blank fields are left to the script)."""
    if not str(base or "").strip():
        raise UserError("--pretrained_model_name_or_path: give a base model (sdlora-tiny, a folder or a Hub id)")
    if not str(data_dir or "").strip():
        raise UserError(f"{RECIPES[recipe].DATA_FLAG}: give the folder of training images")
    if not str(output_dir or "").strip():
        raise UserError("--output_dir: give the folder the run writes to")
    flags = ["--pretrained_model_name_or_path", base.strip(), RECIPES[recipe].DATA_FLAG, data_dir.strip(),
             "--output_dir", output_dir.strip(), "--lora_type", lora_type]
    if recipe == "dreambooth":
        flags += ["--instance_prompt", instance_prompt or ""]
    if mixed_precision and mixed_precision != "default":
        flags += ["--mixed_precision", mixed_precision]
    try:
        for name, value in zip(MAIN_FLAGS, main):
            if name in SWITCHES:
                flags += [f"--{name}"] * (value is True)
            elif str(value if value is not None else "").strip():  # the recipe's argparse checks the value
                flags += [f"--{name}", *(shlex.split(value) if name == "optimizer_args" else [str(value).strip()])]
        more = shlex.split(extra or "")
    except ValueError as e:
        raise UserError(f"more flags: {e}; check the quotes") from None
    if {"-h", "--help"} & set(more):  # argparse would print the help and exit
        raise UserError("more flags: --help: the recipe's flags are listed under All flags")
    return flags + more  # no --class_data_dir: the recipe's own default applies, as on the command line


def checked_flags(recipe, resume, output_dir, *form) -> list:
    """The form as flags, checked by the recipe's own parser before any process starts."""
    flags = train_flags(recipe, *form)
    if resume:
        flags += ["--resume_from_checkpoint", "latest"]
    args = parse_flags(recipe, flags)  # a usage error shows at once
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


# ---------------------------------------------------------------- callbacks

def do_preview(recipe, base, data_dir, instance_prompt, output_dir, lora_type, mixed_precision, extra, *main):
    try:
        flags = checked_flags(recipe, False, output_dir, base, data_dir, instance_prompt, output_dir, lora_type,
                              mixed_precision, extra, *main)
        p = preview(recipe, parse_flags(recipe, flags))
    except UserError as e:
        return [], [], [], f"error: {e}"
    return [(thumbnail(f), c) for f, c in p.images], [list(b) for b in p.buckets], [list(s) for s in p.skipped], \
        p.summary


def do_start(resume, recipe, base, data_dir, instance_prompt, output_dir, lora_type, mixed_precision, extra, prompts,
             *main):
    """What Start (or Resume) did, and the buttons: Start and Resume off while the run goes, Stop on."""
    try:
        flags = checked_flags(recipe, resume, output_dir, base, data_dir, instance_prompt, output_dir, lora_type,
                              mixed_precision, extra, *main)
        job = jobs.start(recipe, flags, output_dir.strip(), prompts)
    except UserError as e:
        return f"error: {e}", *buttons(None)
    return "started: " + jobs.shown(job.command), *buttons(True)


def buttons(running):
    """Start, Resume and Stop as they fit a run going (True), not going (False) or unchanged (None)."""
    if running is None:
        return gr.skip(), gr.skip(), gr.skip()
    return gr.update(interactive=not running), gr.update(interactive=not running), gr.update(interactive=running)


def do_stop(output_dir):
    try:
        return jobs.stop(str(output_dir or "").strip())
    except UserError as e:
        return f"error: {e}"


def poll(output_dir, shown):
    """The run's status line, loss plot and newest samples (plot and gallery only when they changed, and cleared for
    a folder without a run), what the page now shows, and the buttons."""
    import pandas as pd

    if not str(output_dir or "").strip():
        return "", gr.skip(), gr.skip(), shown, *buttons(None)
    st = jobs.state(output_dir.strip())
    rows = [(s, v, "loss") for s, v in st.loss] + [(s, v, "validation loss") for s, v in st.val_loss]
    samples = [str(p) for p in st.samples]
    # Typed columns, and no frame until there is a point: the chart keeps the axis types of the first frame it gets,
    # and an empty frame's columns would make them categorical. (A column named "value" draws nothing.) None clears
    # the chart: a new run, a failed one, or another folder shows no other run's curve.
    plot = gr.skip() if rows == shown.get("rows") else None if not rows else \
        pd.DataFrame(rows, columns=["step", "loss", "curve"]).astype({"step": int, "loss": float, "curve": str})
    gallery = gr.skip() if samples == shown.get("samples") else [x for x in map(served_sample, samples) if x]
    return st.line(), plot, gallery, {"rows": rows, "samples": samples}, *buttons(st.running or st.starting)


def last_output_dir():
    """The folder of the run this UI started last (so a reopened page shows it), else the form's default."""
    folder = jobs.latest()
    return str(folder) if folder else gr.skip()


# ---------------------------------------------------------------- layout

def _shown(default) -> str:
    return "" if default is None else f"{default:g}" if isinstance(default, float) else str(default)


def _flag_box(name: str, defaults: dict):
    """A main flag as text (the optimizer: a list that takes any module.Class too; a switch: a checkbox): blank
    leaves it to the script (as leaving the flag out would)."""
    if name in SWITCHES:
        return gr.Checkbox(bool(defaults[name]), label=f"--{name}", elem_id=f"train_{name}", min_width=100)
    if name == "optimizer":
        return gr.Dropdown(OPTIMIZER_NAMES, value=defaults[name] or "AdamW", label="--optimizer",
                           allow_custom_value=True, elem_id="train_optimizer", min_width=100)
    return gr.Textbox(_shown(defaults[name]), label=f"--{name}", placeholder="script default", max_lines=1,
                      elem_id=f"train_{name}", min_width=100)


def _form_column() -> dict:
    """The left column: the form, the recipe's flags, the data preview. Its components by name."""
    t2i = recipe_defaults("text-to-image")
    c = {}
    with gr.Row():
        c["base"] = gr.Textbox("sdlora-tiny", label="Base model", info="sdlora-tiny (bundled), a local diffusers "
                               "folder or a Hub id", elem_id="train_base")
        c["recipe"] = gr.Radio(list(RECIPES), value="text-to-image", label="Recipe", elem_id="train_recipe")
    with gr.Row():
        c["data_dir"] = gr.Textbox(label="Data folder", info="images with .txt captions or metadata.jsonl "
                                   "(DreamBooth: the subject's photos)", elem_id="train_data")
        c["instance_prompt"] = gr.Textbox(label="Instance prompt (DreamBooth)", placeholder="a photo of sks dog",
                                          visible=False, elem_id="train_instance_prompt")
        c["output_dir"] = gr.Textbox("lora-output", label="Output folder", info="everything the run writes goes "
                                     "here", elem_id="train_output")
    with gr.Row():
        c["lora_type"] = gr.Dropdown(["lora", "dora", "loha", "lokr", "adalora"], value="lora", label="LoRA type",
                                     min_width=100)
        c["mixed_precision"] = gr.Dropdown(["default", "no", "fp16", "bf16"], value="default",
                                           label="Mixed precision", min_width=100)
        c["main"] = [_flag_box(n, t2i) for n in MAIN_FLAGS[:2]]
    for row in (MAIN_FLAGS[2:6], MAIN_FLAGS[6:10], MAIN_FLAGS[10:]):
        with gr.Row():
            c["main"] += [_flag_box(n, t2i) for n in row]
    c["prompts"] = gr.Textbox(label="Sample prompts", lines=2, elem_id="train_prompts",
                              info="one per line, with kohya's options (--n negative, --s steps, --l guidance, "
                              "--w/--h size, --d seed); sampled every sample_every_n_steps, and at the end")
    with gr.Accordion("All flags", open=False):
        c["extra"] = gr.Textbox(label="More flags", elem_id="train_extra",
                                placeholder="--random_flip --lr_scheduler cosine --train_text_encoder")
        c["flag_help"] = gr.Code(recipe_help("text-to-image"), label="The recipe's flags", language=None)
    c["preview_btn"] = gr.Button("Preview data", elem_id="train_preview")
    c["summary"] = gr.Markdown(elem_id="train_summary")
    c["images"] = gr.Gallery(label="Images and captions", columns=8, height=220, elem_id="train_images")
    with gr.Row():
        c["buckets"] = gr.Dataframe(headers=["bucket", "images"], label="Buckets", interactive=False)
        c["skipped"] = gr.Dataframe(headers=["file", "why it is skipped"], label="Skipped files", interactive=False,
                                    elem_id="train_skipped")
    return c


def _run_column() -> dict:
    """The right column: the buttons, the run's status, its loss plot and samples."""
    c = {}
    with gr.Row():
        c["start"] = gr.Button("Start", variant="primary", elem_id="train_start", min_width=80)
        c["stop"] = gr.Button("Stop", elem_id="train_stop", interactive=False, min_width=80)
        c["resume"] = gr.Button("Resume", elem_id="train_resume", min_width=80)
    c["status"] = gr.Markdown(elem_id="train_status")  # live
    c["notice"] = gr.Markdown(elem_id="train_notice")  # what a button did
    c["plot"] = gr.LinePlot(x="step", y="loss", color="curve", label="Loss", elem_id="train_loss", height=240)
    c["samples"] = gr.Gallery(label="Samples (newest first)", columns=4, height=240, elem_id="train_samples")
    return c


def on_recipe(name):
    """The form's fields for recipe `name`: the DreamBooth prompt shown or not, its flags' help, its defaults."""
    d = recipe_defaults(name)
    return [gr.update(visible=name == "dreambooth"), recipe_help(name)] + \
        [bool(d[n]) if n in SWITCHES else _shown(d[n]) for n in MAIN_FLAGS]


def build_train_tab(demo: gr.Blocks):
    """The tab and its events; `demo.load` shows the run this UI started last."""
    with gr.Tab("Train", id="train"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                f = _form_column()
            with gr.Column(scale=2):
                r = _run_column()
        shown = gr.State({})
        timer = gr.Timer(1.0)
    form = [f[k] for k in ("recipe", "base", "data_dir", "instance_prompt", "output_dir", "lora_type",
                           "mixed_precision", "extra")]
    main, run_buttons = f["main"], [r["start"], r["resume"], r["stop"]]
    f["recipe"].change(on_recipe, f["recipe"], [f["instance_prompt"], f["flag_help"], *main])
    f["preview_btn"].click(do_preview, [*form, *main], [f["images"], f["buckets"], f["skipped"], f["summary"]])
    r["start"].click(lambda *a: do_start(False, *a), [*form, f["prompts"], *main], [r["notice"], *run_buttons])
    r["resume"].click(lambda *a: do_start(True, *a), [*form, f["prompts"], *main], [r["notice"], *run_buttons])
    r["stop"].click(do_stop, f["output_dir"], r["notice"])
    timer.tick(poll, [f["output_dir"], shown], [r["status"], r["plot"], r["samples"], shown, *run_buttons],
               show_progress="hidden")
    demo.load(last_output_dir, None, f["output_dir"])
