"""The Train tab: the recipes' main flags as a form (each starting at the recipe's own default), a data preview,
and Start / Stop / Resume of a run in its own process (jobs.py), followed through its output folder."""
from __future__ import annotations

import shlex
from pathlib import Path

import gradio as gr

from ..errors import UserError
from ..recipes import RECIPES
from . import config_form, jobs
from .files import served_sample, thumbnail
from .preview import preview

BASE_CONFIG_INFO = "--base_config: blank for a folder or Hub id, or to let diffusers fetch a single file's configs"
# The main flags on the form; each starts at the selected recipe's own default (None: blank, the script decides).
MAIN_FLAGS = ["resolution", "max_train_steps", "num_train_epochs", "learning_rate", "rank", "train_batch_size",
              "seed", "checkpointing_steps", "validation_split", "sample_every_n_steps"]


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


def train_flags(recipe, base, base_config, data_dir, instance_prompt, output_dir, lora_type, mixed_precision, extra,
                *values) -> list:
    """The form as the recipe's command-line flags (blank fields are left to the script). `values`: the main flags'
    fields, then (optional) the advanced ones, the optimizer, the EMA checkbox and the dataset-config file
    (config_form.py)."""
    main, more_fields = values[:len(MAIN_FLAGS)], values[len(MAIN_FLAGS):]
    dataset_config = str(more_fields[-1] or "").strip() if more_fields else ""
    if not str(base or "").strip():
        raise UserError("--pretrained_model_name_or_path: give a base model (sdlora-tiny, a folder, a Hub id or a "
                        "single-file checkpoint)")
    if not str(data_dir or "").strip() and not dataset_config:
        raise UserError(f"{RECIPES[recipe].DATA_FLAG}: give the folder of training images")
    if not str(output_dir or "").strip():
        raise UserError("--output_dir: give the folder the run writes to")
    data = ["--dataset_config", dataset_config] if dataset_config else [RECIPES[recipe].DATA_FLAG, data_dir.strip()]
    flags = ["--pretrained_model_name_or_path", base.strip(), *data, "--output_dir", output_dir.strip(),
             "--lora_type", lora_type]
    if str(base_config or "").strip():  # a single file's configs; the recipe refuses it beside a folder base
        flags += ["--base_config", base_config.strip()]
    if recipe == "dreambooth":
        flags += ["--instance_prompt", instance_prompt or ""]
    if mixed_precision and mixed_precision != "default":
        flags += ["--mixed_precision", mixed_precision]
    for name, value in zip(MAIN_FLAGS, main):
        if str(value if value is not None else "").strip():  # the recipe's argparse checks the value
            flags += [f"--{name}", str(value).strip()]
    if more_fields:
        flags += config_form.advanced_flags(*more_fields[:-1])
    try:
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

def do_preview(recipe, base, base_config, data_dir, instance_prompt, output_dir, lora_type, mixed_precision, extra,
               *main):
    try:
        flags = checked_flags(recipe, False, output_dir, base, base_config, data_dir, instance_prompt, output_dir,
                              lora_type, mixed_precision, extra, *main)
        p = preview(recipe, parse_flags(recipe, flags))
    except UserError as e:
        return [], [], [], f"error: {e}"
    return [(thumbnail(f), c) for f, c in p.images], [list(b) for b in p.buckets], [list(s) for s in p.skipped], \
        p.summary


def do_start(resume, recipe, base, base_config, data_dir, instance_prompt, output_dir, lora_type, mixed_precision,
             extra, prompts, *main):
    """What Start (or Resume) did, and the buttons: Start and Resume off while the run goes, Stop on."""
    try:
        flags = checked_flags(recipe, resume, output_dir, base, base_config, data_dir, instance_prompt, output_dir,
                              lora_type, mixed_precision, extra, *main)
        job = jobs.start(recipe, flags, output_dir.strip(), prompts)
    except UserError as e:
        return f"error: {e}", *buttons(None)
    return "started: " + jobs.shown(job.command), *buttons(True)


def do_save_config(path, recipe, base, base_config, data_dir, instance_prompt, output_dir, lora_type, mixed_precision,
                   extra, *values):
    try:
        flags = train_flags(recipe, base, base_config, data_dir, instance_prompt, output_dir, lora_type,
                            mixed_precision, extra, *values)
        return config_form.save(path, recipe, flags)
    except UserError as e:
        return f"error: {e}"


def form_outputs(values: list | None, notice: str) -> list:
    """The form's fields set to `values` (None: left as they are) and the notice."""
    n = len(config_form.FIELDS) + len(MAIN_FLAGS) + len(config_form.ADVANCED) + 3
    return [gr.skip()] * n + [notice] if values is None else [*values, notice]


def do_load_config(path, recipe):
    try:
        return form_outputs(config_form.load(path, recipe, MAIN_FLAGS), f"loaded {str(path).strip()}")
    except UserError as e:
        return form_outputs(None, f"error: {e}")


def restore_form():
    """On a (re)load: the run this UI started last, its folder and settings in the form."""
    folder = jobs.latest()
    try:
        values = folder and config_form.restore(jobs.launched_flags(folder), folder, MAIN_FLAGS)
    except UserError:
        values = None
    out = form_outputs(values or None, "")[:-1]
    if folder and not values:
        out[config_form.FIELDS.index("output_dir")] = str(folder)
    return out


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


# ---------------------------------------------------------------- layout

def _shown(default) -> str:
    return "" if default is None else f"{default:g}" if isinstance(default, float) else str(default)


def _flag_box(name: str, defaults: dict):
    """A main flag as text: blank leaves it to the script (as leaving the flag out would)."""
    return gr.Textbox(_shown(defaults[name]), label=f"--{name}", placeholder="script default", max_lines=1,
                      elem_id=f"train_{name}", min_width=100)


def _form_column() -> dict:
    """The left column: the form, the recipe's flags, the data preview. Its components by name."""
    t2i = recipe_defaults("text-to-image")
    c = _config_row()
    with gr.Row():
        c["base"] = gr.Textbox("sdlora-tiny", label="Base model", info="sdlora-tiny (bundled), a local diffusers "
                               "folder, a Hub id or a single-file .safetensors checkpoint", elem_id="train_base")
        c["base_config"] = gr.Textbox(label="Base configs (for a single file, offline)", placeholder="a diffusers "
                                      "folder or Hub id of its family", info=BASE_CONFIG_INFO,
                                      elem_id="train_base_config")
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
    for row in (MAIN_FLAGS[2:6], MAIN_FLAGS[6:]):
        with gr.Row():
            c["main"] += [_flag_box(n, t2i) for n in row]
    c["prompts"] = gr.Textbox(label="Sample prompts", lines=2, elem_id="train_prompts",
                              info="one per line, with kohya's options (--n negative, --s steps, --l guidance, "
                              "--w/--h size, --d seed); sampled every sample_every_n_steps, and at the end")
    c.update(_advanced())
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


def _on_recipe(name):
    d = recipe_defaults(name)
    return [gr.update(visible=name == "dreambooth"), recipe_help(name)] + [_shown(d[n]) for n in MAIN_FLAGS]


def _config_row() -> dict:
    """Save / Load config and the preset picker."""
    from ..recipes import presets

    c = {}
    with gr.Row():
        c["config_path"] = gr.Textbox(label="Config file (TOML)", placeholder="run.toml", max_lines=1,
                                      elem_id="train_config_path", info="the --config_file the scripts read")
        c["preset"] = gr.Dropdown([""] + presets.names(), value="", label="Preset", elem_id="train_preset",
                                  info="fills the form (`sdlora presets`)")
    with gr.Row():
        c["load"] = gr.Button("Load config", elem_id="train_load", size="sm")
        c["save"] = gr.Button("Save config", elem_id="train_save", size="sm")
    return c


# The Advanced fields beside the optimizer (its arguments, LoRA+, EMA); the other ADVANCED ones go in the row above.
OPTIMIZER_ROW = ("optimizer_args", "loraplus_lr_ratio", "ema_decay")


def _advanced() -> dict:
    """Labelled advanced settings, each showing what it is when left blank: the schedule and LoRA settings, then the
    optimizer with its arguments, LoRA+ and EMA."""
    c, boxes = {}, {}
    d = config_form.resolved_defaults("text-to-image")

    def box(name):
        boxes[name] = gr.Textbox("", label=config_form.ADVANCED[name], placeholder=str(d[name]), max_lines=1,
                                 elem_id=f"train_{name}", min_width=100)
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            boxes["lr_scheduler"] = gr.Dropdown(list(RECIPES["text-to-image"].parser()._option_string_actions[
                "--lr_scheduler"].choices), value=d["lr_scheduler"], label="LR schedule", elem_id="train_lr_scheduler",
                min_width=100)
            for name in config_form.ADVANCED:
                if name not in boxes and name not in OPTIMIZER_ROW:
                    box(name)
        with gr.Row():
            c["optimizer"] = gr.Dropdown(config_form.OPTIMIZERS, value="AdamW", label="Optimizer",
                                         info='all but AdamW: pip install "sdlora[optimizers]"',
                                         allow_custom_value=True,  # module.Class, as --optimizer takes it
                                         elem_id="train_optimizer", min_width=100)
            box("optimizer_args")
            box("loraplus_lr_ratio")
            c["use_ema"] = gr.Checkbox(False, label="EMA", info="--use_ema: an average of the LoRA weights "
                                       "draws the samples and is saved", elem_id="train_use_ema", min_width=100)
            box("ema_decay")
        c["dataset_config"] = gr.Textbox(label="Dataset config (kohya TOML)", max_lines=1, elem_id="train_dataset_config",
                                         info="[[datasets]] / [[datasets.subsets]]: used instead of the Data folder "
                                              "(text-to-image); Preview data lists its subsets")
    c["adv"] = [boxes[name] for name in config_form.ADVANCED]  # in ADVANCED's order, as the callbacks take them
    return c


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
    form = [f[k] for k in config_form.FIELDS]
    run_buttons = [r["start"], r["resume"], r["stop"]]
    main = [*f["main"], *f["adv"], f["optimizer"], f["use_ema"], f["dataset_config"]]  # every field after `form`
    f["recipe"].change(_on_recipe, f["recipe"], [f["instance_prompt"], f["flag_help"], *f["main"]])
    f["preview_btn"].click(do_preview, [*form, *main], [f["images"], f["buckets"], f["skipped"], f["summary"]])
    r["start"].click(lambda *a: do_start(False, *a), [*form, f["prompts"], *main], [r["notice"], *run_buttons])
    r["resume"].click(lambda *a: do_start(True, *a), [*form, f["prompts"], *main], [r["notice"], *run_buttons])
    r["stop"].click(do_stop, f["output_dir"], r["notice"])
    timer.tick(poll, [f["output_dir"], shown], [r["status"], r["plot"], r["samples"], shown, *run_buttons],
               show_progress="hidden")
    f["load"].click(do_load_config, [f["config_path"], f["recipe"]], [*form, *main, r["notice"]])
    f["preset"].change(lambda name, recipe: do_load_config(name, recipe) if name else form_outputs(None, ""),
                       [f["preset"], f["recipe"]], [*form, *main, r["notice"]])
    f["save"].click(do_save_config, [f["config_path"], *form, *main], r["notice"])
    demo.load(restore_form, None, [*form, *main])
