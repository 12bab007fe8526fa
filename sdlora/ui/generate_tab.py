"""The Generate tab: images from a base model with up to LORA_SLOTS weighted LoRAs, through the same loader, checks
and PNG records as `sdlora generate`; 'before/after' draws the base image at the same seed first."""
from __future__ import annotations

import secrets
from pathlib import Path
import threading

import gradio as gr

from .. import models, pipeline, sd3base
from ..errors import UserError
from ..lora import formats
from .files import served

LORA_SLOTS = 4

_loaded: dict = {}  # (base, base configs) -> pipeline.Adapters: one base in memory at a time, with the last generation's LoRAs
_lock = threading.Lock()  # one generation at a time: the adapters are the pipeline's state


def _adapters(base: str, base_config=None) -> pipeline.Adapters:
    if (base, base_config) not in _loaded:
        _loaded.clear()
        _loaded[base, base_config] = pipeline.load_adapters((), base=base, base_config=base_config)
    return _loaded[base, base_config]


def do_generate(base, base_config, prompt, negative, seed, steps, guidance, width, height, scheduler, mode, out,
                *slots):
    """Images into `out`, each with its parameters embedded; with LoRAs 'before/after', the base image at the same
    seed first. `base_config`: a single-file base's configs (blank: diffusers' pick, which needs the Hub). Returns
    (gallery, files, status)."""
    try:
        if not str(out or "").strip():
            raise UserError("output folder: give the folder the images are written to")
        if not str(prompt or "").strip():
            raise UserError("prompt: write what to draw")
        specs = [(p.strip(), float(w)) for p, w in zip(slots[::2], slots[1::2]) if str(p or "").strip()]
        read = [(formats.load_lora(p), w) for p, w in specs]  # a bad file fails here, before any model loads
        base = str(base or "").strip() or pipeline.base_from(read)
        base_config = str(base_config or "").strip() or None
        seed = int(seed) if seed is not None and seed >= 0 else secrets.randbelow(2**31)
        w, h = (int(v) if v else None for v in (width, height))  # 0 or blank: the model's own size
        with _lock:
            adapters = _adapters(base, base_config)
            pipe = adapters.pipe
            pipeline.set_scheduler(pipe, scheduler)
            adapters.clear()
            adapters.add(read)
            paths, captions = [], []
            runs = [("base", False), ("with LoRAs", True)] if mode == "before/after" and read else \
                [("base", False)] if mode == "off" or not read else [("with LoRAs", True)]
            for label, on in runs:
                (pipe.enable_lora if on else pipe.disable_lora)() if read else None
                images = pipeline.generate(pipe, prompt, negative or None, seed, int(steps), float(guidance), w, h)
                paths += pipeline.write_images(adapters, images, out.strip(), prompt, negative or None, seed,
                                               int(steps), float(guidance), scheduler, loras=None if on else [])
                captions.append(f"{label} · seed {seed}")
            if read:
                pipe.enable_lora()
    except UserError as e:
        return gr.skip(), gr.skip(), f"error: {e}"
    copies = [served(p) for p in paths]
    return list(zip(copies, captions)), copies, "wrote " + ", ".join(map(str, paths))


def guidance_for(base: str) -> float:
    """The Guidance slider's value for a base typed in: what `sdlora generate` uses when --guidance is not given
    (an SD3 folder's is its pipeline's own; a Hub id is not looked up while the user types)."""
    base = (base or "").strip()
    if not base:
        return models.GUIDANCE
    own = None
    if (Path(base).expanduser() / "model_index.json").is_file():
        try:
            import diffusers

            pipeline_class = models.base_configs(base)[0]
            own = sd3base.own_guidance(getattr(diffusers, pipeline_class)) if pipeline_class else None
        except (UserError, OSError, ValueError):
            own = None  # an unreadable folder: the generate run says why
    return models.default_guidance(base, own)


def build_generate_tab():
    with gr.Tab("Generate", id="generate"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Row():
                    base = gr.Textbox("sdlora-tiny", label="Base model", info="a folder, Hub id or single-file "
                                      ".safetensors; blank: the first LoRA's base model", elem_id="gen_base")
                    base_config = gr.Textbox(label="Base configs (for a single file, offline)",
                                             placeholder="a diffusers folder or Hub id of its family",
                                             elem_id="gen_base_config")
                    out = gr.Textbox("outputs", label="Output folder", elem_id="gen_out")
                prompt = gr.Textbox(label="Prompt", elem_id="gen_prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="gen_negative")
                slots = []
                for i in range(LORA_SLOTS):
                    with gr.Row():
                        slots.append(gr.Textbox(label=f"LoRA {i + 1}", placeholder="a LoRA folder, .safetensors "
                                                "file or Hub id", elem_id=f"gen_lora{i + 1}", scale=4))
                        slots.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="weight",
                                               elem_id=f"gen_weight{i + 1}"))
                with gr.Row():
                    seed = gr.Number(0, label="Seed (-1: random)", precision=0, elem_id="gen_seed", min_width=120)
                    steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="gen_steps")
                    guidance = gr.Slider(0, 20, value=guidance_for(base.value), step=0.5, label="Guidance",
                                         elem_id="gen_guidance")
                with gr.Row():
                    width = gr.Number(None, label="Width (blank: the model's)", precision=0, elem_id="gen_width",
                                      min_width=120)
                    height = gr.Number(None, label="Height (blank: the model's)", precision=0,
                                       elem_id="gen_height", min_width=120)
                    scheduler = gr.Dropdown([k for k in pipeline.SCHEDULERS if k != "keep"], value="dpm++",
                                            label="Scheduler", min_width=120)
                    mode = gr.Radio(["on", "off", "before/after"], value="before/after", label="LoRAs",
                                    elem_id="gen_mode")
            with gr.Column(scale=2):
                go = gr.Button("Generate", variant="primary", elem_id="gen_go")
                status = gr.Markdown(elem_id="gen_status")
                gallery = gr.Gallery(label="Images", columns=2, height=300, elem_id="gen_gallery")
                files = gr.File(label="Download (PNG with its parameters)", file_count="multiple",
                                elem_id="gen_files")
    base.change(guidance_for, base, guidance)
    go.click(do_generate, [base, base_config, prompt, negative, seed, steps, guidance, width, height, scheduler, mode,
                           out, *slots],
             [gallery, files, status])
