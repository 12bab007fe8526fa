"""`sdlora ui`: the local web UI (Gradio; `pip install "sdlora[ui]"`). It listens on this machine only unless
given a password: anyone who reaches it can train, read folders and write files as the user running it."""
from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError


def register(sub):
    s = sub.add_parser("ui", help="a local web UI: train, generate, LoRA tools (needs pip install \"sdlora[ui]\")")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only); any other needs --auth")
    s.add_argument("--port", type=int, default=7860, help="the port to serve on")
    s.add_argument("--auth", metavar="USER:PASSWORD", help="require this login (visible to other users in `ps`; "
                   "prefer --auth-file)")
    s.add_argument("--auth-file", metavar="FILE", help="a file with USER:PASSWORD lines, each a login")
    s.add_argument("--allowed-host", action="append", default=[], metavar="NAME[:PORT]",
                   help="also answer requests addressed to this host name (e.g. a reverse proxy's; repeatable). "
                   "By default only the --host address, localhost, 127.0.0.1 and [::1] at --port are: a request "
                   "for any other name, or from another site's page, is refused")
    s.set_defaults(func=_ui_cli)


def local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def logins(auth: str | None, auth_file: str | None) -> list[tuple[str, str]]:
    pairs = []
    lines = [("--auth", auth)] if auth else []
    if auth_file:
        try:
            text = Path(auth_file).read_text()
        except OSError as e:
            raise UserError(f"--auth-file {auth_file}: can't read it ({e.strerror})") from None
        lines += [(f"--auth-file {auth_file}, line {n}", ln.strip()) for n, ln in enumerate(text.splitlines(), 1)
                  if ln.strip() and not ln.startswith("#")]
        if not any(w.startswith("--auth-file") for w, _ in lines):
            raise UserError(f"--auth-file {auth_file}: no USER:PASSWORD line in it")
    for where, line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise UserError(f"{where}: expected USER:PASSWORD with both parts")  # the value itself is not shown
        pairs.append((user, password))
    return pairs


def _ui_cli(args):
    auth = logins(args.auth, args.auth_file)
    if not local(args.host) and not auth:
        raise UserError(f"--host {args.host} listens beyond this machine: give --auth USER:PASSWORD or --auth-file "
                        "FILE (anyone who reaches it could train and write files as you), or use --host 127.0.0.1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if "GRADIO_TEMP_DIR" not in os.environ:  # Gradio's copies of served files: its own folder, gone at exit
        tmp = tempfile.mkdtemp(prefix="sdlora-ui-")
        atexit.register(shutil.rmtree, tmp, True)
        os.environ["GRADIO_TEMP_DIR"] = tmp
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError('sdlora ui needs Gradio: pip install "sdlora[ui]"') from None
    import socket

    import uvicorn

    from ..ui.app import server

    try:  # a port in use is one line before the UI is built, not uvicorn's log
        with socket.create_server((args.host, args.port), family=socket.AF_INET6 if ":" in args.host else
                                  socket.AF_INET):
            pass
    except OSError as e:
        raise UserError(f"--port {args.port}: can't listen on {args.host}:{args.port} ({e.strerror}); choose another "
                        "--port or --host") from None
    app = server(args.host, args.port, auth, args.allowed_host)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"sdlora ui on http://{shown}:{args.port} (Ctrl+C stops the UI; training runs keep going)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
