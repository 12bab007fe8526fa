"""Which requests `sdlora ui` answers: only those addressed to it by a name it was started with, from its own pages.

A web page the user visits elsewhere can point a name of its own at 127.0.0.1 (DNS rebinding) or post to the UI
from its own origin; either way the request would train, read folders and write files as the user. So every HTTP
and websocket request must carry a `Host` this UI answers to, and an `Origin`, when it has one, that is one of those
hosts too; anything else gets a 403 before it reaches Gradio, which therefore never sees (nor echoes in its CORS
headers) a foreign origin. A plain ASGI middleware: no Gradio or Starlette needed to use or test it.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from ..errors import UserError

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD = ("0.0.0.0", "::", "")


def _split(host: str) -> tuple[str, int | None] | None:
    """('name', port or None) from a Host header value or a URL's netloc; None if it is not one."""
    try:
        u = urlsplit("//" + host)
        return (u.hostname or "").lower(), u.port
    except ValueError:
        return None


class Allowed:
    """The host names (with the UI's port) that address this UI, and any the user named with --allowed-host."""

    def __init__(self, bound: str, port: int, extra: list[str] = ()):
        self.port = port
        self.names = {bound.strip("[]").lower(), *LOCAL_NAMES}
        self.wildcard = bound.strip("[]") in WILDCARD  # listening on every address: any address typed is one of ours
        self.extra = set()  # (name, port or None: any port, as behind a proxy)
        for e in extra:
            parts = _split(e)
            if not parts or not parts[0]:
                raise UserError(f"--allowed-host {e}: expected a host name, optionally with :PORT")
            self.extra.add(parts)

    def host(self, value: str | None, default_port: int = 80, literals: bool = True) -> bool:
        parts = _split(value or "")
        if not parts or not parts[0]:
            return False
        name, port = parts
        if (name, port) in self.extra or (name, None) in self.extra:
            return True
        if (port or default_port) != self.port:
            return False
        if name in self.names:
            return True
        # Rebinding needs a name the attacker controls; an address literal was typed by whoever reached this machine.
        return literals and self.wildcard and _is_address(name)

    def origin(self, value: str, host: str) -> bool:
        """An Origin is ours if it is the page the request is addressed to, or one of the names (not any address
        literal: a page at another machine's address is another site)."""
        try:
            u = urlsplit(value)
        except ValueError:
            return False
        if u.scheme not in ("http", "https") or not u.netloc or u.path not in ("", "/"):
            return False  # "null" (sandboxed frames, files) included
        return u.netloc.lower() == host.lower() or self.host(u.netloc, 443 if u.scheme == "https" else 80, False)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HostGuard:
    """ASGI middleware: a 403 for a request whose Host or Origin is not one `allowed` accepts."""

    def __init__(self, app, allowed: Allowed):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host, origin = headers.get("host"), headers.get("origin")
        why = None
        if not self.allowed.host(host):
            why = f"Host {host!r} is not a name this UI answers to"
        elif origin is not None and not self.allowed.origin(origin, host):
            why = f"requests from {origin!r} are refused: only this UI's own pages may use it"
        if why is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = (f"sdlora ui: {why} (start it with --allowed-host NAME to allow a name of yours)\n").encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
