"""The operator console under /console: pages read the tables the CLI reads; Retry and
Cancel call the functions `pacs-ai jobs retry` / `jobs cancel` call.

It is an app of its own mounted beside DICOMweb, so its refusals are pages (or a redirect
to the login form) while DICOMweb's stay plain text; both log them as one line.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route

from daemon.http.console.app import build
from daemon.http.context import HttpContext

ROOT = "/console"


def mounted(ctx: HttpContext) -> list[BaseRoute]:
    """The console under /console, and / sending browsers there."""
    from starlette.responses import RedirectResponse

    async def home(_request: object) -> RedirectResponse:
        return RedirectResponse(f"{ROOT}/", status_code=307)

    return [Route("/", home, methods=["GET"]), Mount(ROOT, app=build(ctx))]
