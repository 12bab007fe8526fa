"""The Tools tab: inspect, convert, resize, merge and extract LoRA files with the library's tools (sdlora/toolkit.py),
showing the report each returns or its one-line `error: …`. It writes new files only."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from .. import toolkit
from ..errors import UserError
from ..lora import formats


def _report(run) -> str:
    try:
        return run()
    except UserError as e:
        return f"error: {e}"


def _given(value, field: str) -> str:
    """A form field's text; a blank one is a one-line error naming the field."""
    text = str(value or "").strip()
    if not text:
        raise UserError(f"{field}: the field is empty; fill it in")
    return text


def new_output(out) -> str | None:
    """The one-line refusal of an output that is already there (a file, or a folder with files in it): the Tools
    tab writes new files only, and says so rather than replacing one silently."""
    p = Path(str(out or "").strip()).expanduser()
    if str(out or "").strip() and (p.is_symlink() or (p.exists() and not (p.is_dir() and not any(p.iterdir())))):
        return (f"error: {str(out).strip()} already exists: the UI writes only new files; choose a new output path "
                "(or delete it first)")
    return None


def tool_inspect(file):
    return _report(lambda: toolkit.inspect_file(_given(file, "LoRA file or folder")))


def tool_convert(file, out, to):
    return new_output(out) or _report(lambda: toolkit.convert_file(
        _given(file, "LoRA file or folder"), _given(out, "Output file or folder"), to))


def tool_resize(file, out, rank):
    return new_output(out) or _report(lambda: toolkit.resize_file(
        _given(file, "LoRA file or folder"), _given(out, "Output file or folder"), int(rank or 0)))


def tool_merge(files, out, rank):
    items = [line.strip() for line in (files or "").splitlines() if line.strip()]
    return new_output(out) or _report(lambda: toolkit.merge_files(items, str(out or "").strip(),
                                                                   int(rank) if rank else None))


def tool_extract(base, tuned, base_config, out, rank, to):
    """A LoRA approximating tuned - base; either model may be a single-file checkpoint, read with `base_config`."""
    return new_output(out) or _report(lambda: toolkit.extract_file(
        _given(base, "Extract: base model"), _given(tuned, "Extract: tuned model"), int(rank or 0),
        _given(out, "Output file or folder"), to, base_config=str(base_config or "").strip() or None))


def build_tools_tab():
    with gr.Tab("Tools", id="tools"):
        t_file = gr.Textbox(label="LoRA file or folder", elem_id="tool_file")
        t_out = gr.Textbox(label="Output file or folder (a new one: the UI replaces nothing)", elem_id="tool_out")
        with gr.Row():
            t_to = gr.Dropdown(list(formats.FORMATS), value="kohya", label="Convert to (kohya: ComfyUI/A1111)")
            t_rank = gr.Number(None, label="Rank (resize, extract; merge: optional SVD rank)", precision=0)
        t_merge = gr.Textbox(label="Merge: LoRAs with weights, one per line (path:weight)", lines=3)
        with gr.Row():
            t_base = gr.Textbox(label="Extract: base model", placeholder="a folder, Hub id or single-file "
                                ".safetensors", elem_id="tool_base")
            t_tuned = gr.Textbox(label="Extract: tuned model", elem_id="tool_tuned")
            t_base_config = gr.Textbox(label="Base configs (for a single file, offline)", placeholder="a diffusers "
                                       "folder or Hub id of its family", elem_id="tool_base_config")
        with gr.Row():
            b_inspect, b_convert = gr.Button("Inspect"), gr.Button("Convert")
            b_resize, b_merge = gr.Button("Resize"), gr.Button("Merge")
            b_extract = gr.Button("Extract")
        t_result = gr.Code(label="Result", language=None, elem_id="tool_result")
    b_inspect.click(tool_inspect, t_file, t_result)
    b_convert.click(tool_convert, [t_file, t_out, t_to], t_result)
    b_resize.click(tool_resize, [t_file, t_out, t_rank], t_result)
    b_merge.click(tool_merge, [t_merge, t_out, t_rank], t_result)
    b_extract.click(tool_extract, [t_base, t_tuned, t_base_config, t_out, t_rank, t_to], t_result)
