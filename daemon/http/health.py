"""`/healthz`, `/readyz` for load balancers and `/metrics` for Prometheus.

`/healthz` means what the watchdog means: 200 while every part of the service is healthy
(the health loop would pet the watchdog), 503 naming the faults otherwise. `/readyz` is
200 only once the service has started and until it starts draining. Both answer without
credentials (load balancers send none); `/metrics` needs the `read` permission.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from daemon.http.auth import READ
from daemon.http.context import context

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


async def healthz(request: Request) -> Response:
    faults = await run_in_threadpool(context(request).health)
    if faults:
        return JSONResponse({"status": "unhealthy", "faults": faults}, status_code=503)
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    ctx = context(request)
    if not ctx.ready():
        return JSONResponse({"status": "not ready", "faults": ["starting or draining"]}, 503)
    faults = await run_in_threadpool(ctx.health)
    if faults:
        return JSONResponse({"status": "not ready", "faults": faults}, status_code=503)
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    from prometheus_client import generate_latest

    ctx = context(request)
    ctx.auth.authorize(request, READ)
    if ctx.registry is None:
        return Response("metrics are not collected in this process\n", status_code=404)
    body = await run_in_threadpool(generate_latest, ctx.registry)
    return Response(body, media_type=PROMETHEUS_TEXT)


def routes() -> list[BaseRoute]:
    """Health and metrics at the root of the server."""
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
