"""The operator console under /console: pages read the tables the CLI reads; Retry and
Cancel call the functions `pacs-ai jobs retry` / `jobs cancel` call.

It is an app of its own mounted beside DICOMweb, so its refusals are pages (or a redirect
to the login form) while DICOMweb's stay plain text; both log them as one line.
"""

from __future__ import annotations

import socket

from starlette.routing import BaseRoute, Mount, Route

from daemon.config import HttpSettings
from daemon.http.console.app import build
from daemon.http.context import HttpContext

ROOT = "/console"


def console_url(http: HttpSettings, port: int | None = None) -> str:
    """Where a browser finds the console (a wildcard bind named as this host)."""
    host = socket.gethostname() if http.bind in ("0.0.0.0", "::") else http.bind
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if http.tls else 'http'}://{host}:{port or http.port}{ROOT}/"


def mounted(ctx: HttpContext) -> list[BaseRoute]:
    """The console under /console, and / sending browsers there."""
    from starlette.responses import RedirectResponse

    async def home(_request: object) -> RedirectResponse:
        return RedirectResponse(f"{ROOT}/", status_code=307)

    return [Route("/", home, methods=["GET"]), Mount(ROOT, app=build(ctx))]
