"""The Dataset tab: caption or tag a folder with the library `sdlora caption` uses (sdlora/caption/), see the
images with their captions, edit them in a table or in bulk (add, remove, replace a tag), save, and see the tag
frequency. Only caption files beside the folder's images are written; the Train tab's preview then reads them."""
from __future__ import annotations

import threading

import gradio as gr

from ..caption import edits, folder, models, tags
from ..caption.run import Wording, caption_folder
from ..caption.wd14 import TagOptions
from ..errors import UserError
from .files import thumbnail

MODES = {"skip images that have one": "skip", "replace them": "overwrite", "add the new tags": "append"}
_lock = threading.Lock()  # one captioning run at a time: a model in memory is large
_loaded: dict = {}  # (model, device) -> the captioner: one in memory at a time


def _text(value, field: str) -> str:
    text = str(value or "").strip()
    if not text:
        raise UserError(f"{field}: the field is empty; fill it in")
    return text


def _captioner(model: str, threshold):
    source = models.identify(model)
    device, dtype = models.device_and_precision(None, None)
    key = (model, threshold if source.family == "wd14" else None)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = models.load(source, device, dtype, tag_options=TagOptions(general_threshold=float(threshold)))
    return _loaded[key]


def shown(data_dir, recursive):
    """The gallery (thumbnails with captions), the table, the tag frequency and a status line for the folder."""
    rows, skipped = edits.read_captions(_text(data_dir, "Data folder"), recursive=bool(recursive))
    return _views(data_dir, rows, f"{len(rows)} image(s)" + (f", {len(skipped)} file(s) skipped: " +
                                                            "; ".join(f"{p.name}: {w}" for p, w in skipped[:5])
                                                            if skipped else ""))


def _views(data_dir, rows, status):
    from pathlib import Path

    base = Path(str(data_dir).strip()).expanduser()
    gallery = [(thumbnail(base / name), caption or "(no caption)") for name, caption in rows]
    freq = tags.frequency(c for _, c in rows)
    return gallery, [list(r) for r in rows], [[t, n] for t, n in freq.most_common()], status


def _errors(fn):
    def run(*args, **kw):
        try:
            return fn(*args, **kw)
        except UserError as e:
            return gr.update(), gr.update(), gr.update(), f"error: {e}"
    return run


@_errors
def do_load(data_dir, recursive):
    return shown(data_dir, recursive)


@_errors
def do_caption(data_dir, model, prefix, mode, recursive, threshold, progress=gr.Progress()):
    plan = folder.plan(_text(data_dir, "Data folder"), ".txt", MODES.get(mode, "skip"), bool(recursive))
    if plan.items:
        with _lock:
            captioner = _captioner(_text(model, "Captioning model"), threshold or 0.35)
            progress(0, desc=f"captioning {len(plan.items)} image(s)")
            summary = caption_folder(plan, captioner, Wording(str(prefix or "").strip()),
                                     on_batch=lambda done, total: progress(done / total, desc=f"{done}/{total}"))
        said = summary.text().replace("\n", "; ")
    else:
        said = f"nothing to caption: {len(plan.skipped)} file(s) skipped"
    *views, _ = shown(data_dir, recursive)
    return *views, said


@_errors
def do_save(data_dir, recursive, table):
    rows = [(r[0], r[1]) for r in _table_rows(table)]
    written = edits.save_captions(_text(data_dir, "Data folder"), rows, recursive=bool(recursive))
    *views, _ = shown(data_dir, recursive)
    return *views, f"saved {len(written)} caption(s)"


def _table_rows(table) -> list[list]:
    if hasattr(table, "values"):  # a pandas DataFrame
        table = table.values.tolist()
    return [list(r) for r in (table or []) if r and str(r[0]).strip()]


def do_bulk(data_dir, table, add, remove, replace):
    """The table with tags added, removed and replaced in every caption (not saved yet)."""
    pairs = [p.split("->", 1) for p in str(replace or "").split(",") if "->" in p]
    rows = [(r[0], tags.edit(str(r[1] or ""), tags.split_tags(str(add or "")), tags.split_tags(str(remove or "")),
                             {a.strip(): b.strip() for a, b in pairs})) for r in _table_rows(table)]
    return *_views(data_dir, rows, "edited in the table: Save writes the captions"),


def build_dataset_tab():
    with gr.Tab("Dataset", id="dataset"):
        with gr.Row():
            d_dir = gr.Textbox(label="Data folder", info="images; each caption goes in a same-name .txt beside it",
                               elem_id="ds_dir")
            d_model = gr.Textbox(label="Captioning model", elem_id="ds_model",
                                 info="a Hub id or folder: BLIP, Florence-2, a VLM or a WD14 tagger")
            d_prefix = gr.Textbox(label="Prefix (trigger word)", elem_id="ds_prefix")
        with gr.Row():
            d_mode = gr.Radio(list(MODES), value=next(iter(MODES)), label="Existing captions")
            d_recursive = gr.Checkbox(label="Sub-folders too (kohya's 10_name folders)")
            d_threshold = gr.Number(0.35, label="Tagger threshold", minimum=0.01, maximum=0.99)
        with gr.Row():
            b_load = gr.Button("Load captions", elem_id="ds_load")
            b_caption = gr.Button("Caption / tag", variant="primary", elem_id="ds_caption")
            b_save = gr.Button("Save", elem_id="ds_save")
        d_status = gr.Markdown(elem_id="ds_status")
        d_gallery = gr.Gallery(label="Images and captions", columns=8, height=220, elem_id="ds_gallery")
        d_table = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], interactive=True,
                               type="array", label="Captions (edit, then Save)", elem_id="ds_table")
        with gr.Row():
            d_add = gr.Textbox(label="Add tags", placeholder="sks, photo", elem_id="ds_add")
            d_remove = gr.Textbox(label="Remove tags", elem_id="ds_remove")
            d_replace = gr.Textbox(label="Replace tags", placeholder="old -> new, a -> b", elem_id="ds_replace")
            b_bulk = gr.Button("Apply to all", elem_id="ds_bulk")
        d_freq = gr.Dataframe(headers=["tag", "images"], interactive=False, label="Tag frequency", elem_id="ds_freq")
    views = [d_gallery, d_table, d_freq, d_status]
    b_load.click(do_load, [d_dir, d_recursive], views)
    b_caption.click(do_caption, [d_dir, d_model, d_prefix, d_mode, d_recursive, d_threshold], views)
    b_save.click(do_save, [d_dir, d_recursive, d_table], views)
    b_bulk.click(do_bulk, [d_dir, d_table, d_add, d_remove, d_replace], views)
