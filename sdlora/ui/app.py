"""The Gradio app behind `sdlora ui`: Train, Dataset, Generate and Tools tabs over the same recipes, loader, captioners
and tools the command line uses. Every action's problem shows as the scripts' one-line `error: …`; files are written only into
the output folders named in the form."""
from __future__ import annotations

import gradio as gr

from .dataset_tab import build_dataset_tab
from .generate_tab import build_generate_tab
from .tools_tab import build_tools_tab
from .train_tab import build_train_tab

THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build() -> gr.Blocks:
    """Each tab in two columns: the form on the left; the buttons, the run's status and the results on the right,
    at the top, so they are in view without scrolling on a laptop screen (1366×768)."""
    with gr.Blocks(title="sdlora") as demo:
        gr.Markdown("## sdlora: train and use Stable Diffusion LoRAs")
        build_train_tab(demo)
        build_dataset_tab()
        build_generate_tab()
        build_tools_tab()
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


def theme():
    return gr.themes.Default(**THEME_FONTS)  # system fonts: the page loads nothing from the internet
