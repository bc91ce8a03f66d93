"""The ASGI app: route groups mounted side by side, one refusal handler, optional CORS.

A route group is a module with `routes()` (health and metrics at the root, DICOMweb under
/dicomweb; the operator console, an app of its own, under /console) whose endpoints reach the shared
`HttpContext` and ask its `Authenticator` for the permission they need. Every refused
request (401, 403, 404, 405, 408, 413, 415, ...) is answered and logged here, once.
"""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.http import console, dicomweb, health
from daemon.http.context import STATE_KEY, HttpContext, log_refusal

log = logging.getLogger(__name__)

DICOMWEB_ROOT = "/dicomweb"
# Known first path segments, the `route` label of the request counter (others: "other").
ROUTE_LABELS = ("dicomweb", "healthz", "readyz", "metrics", "console")


async def refused(request: Request, exc: Exception) -> Response:
    """Answer an HTTPException (ours or the router's) and log it as one line."""
    assert isinstance(exc, HTTPException)
    log_refusal(request, exc)
    return PlainTextResponse(exc.detail + "\n", status_code=exc.status_code, headers=exc.headers)


class _CountRequests:
    """Counts answered requests by first path segment and status."""

    def __init__(self, app: ASGIApp, ctx: HttpContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.ctx.metrics
        if scope["type"] != "http" or metrics is None:
            await self.app(scope, receive, send)
            return
        segment = scope["path"].strip("/").split("/")[0]
        route = segment if segment in ROUTE_LABELS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                metrics.http_requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def build_app(ctx: HttpContext) -> Starlette:
    """The app the HTTP server runs, for one service's context."""
    middleware = [Middleware(_CountRequests, ctx=ctx)]
    origins = ctx.settings.http.cors_origins
    if origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "Accept"],
            )
        )
    app = Starlette(
        routes=[
            *health.routes(),
            Mount(DICOMWEB_ROOT, routes=dicomweb.routes()),
            *console.mounted(ctx),
        ],
        middleware=middleware,
        exception_handlers={HTTPException: refused},
    )
    setattr(app.state, STATE_KEY, ctx)
    return app
