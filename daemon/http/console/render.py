"""Templates shipped in the package, rendered with every value escaped, and the JSON twin.

A page answers HTML (the whole page, or with `?fragment=1` only its live part, which the
page's script fetches every few seconds and swaps in), or JSON when the client asks for
`application/json` (scripts with a bearer token).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from daemon.db.queue import CANCELLABLE, RETRYABLE
from daemon.db.schema import DispatchState, JobState

# Sent with every console response: no inline script or style, no framing, no caching.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
REFRESH_SECONDS = 3


def when(value: dt.datetime | None) -> str:
    """A timestamp as the pages print it: UTC, to the second."""
    if value is None:
        return "-"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: float | None) -> str:
    """A duration in the unit that reads best."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    if value < 2 * 86400:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.0f} d"


def size(value: int | None) -> str:
    """Bytes in binary units."""
    if value is None:
        return "unknown"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024:
            return f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"


def environment() -> Environment:
    """The templates of daemon/http/console/templates, autoescaped."""
    env = Environment(
        loader=PackageLoader("daemon.http.console", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=when, seconds=seconds, size=size)
    # The states by their names, and those an operator's Retry and Cancel act on (the
    # buttons show where they work).
    env.globals.update(
        refresh_seconds=REFRESH_SECONDS,
        JobState=JobState,
        DispatchState=DispatchState,
        retryable=RETRYABLE,
        cancellable=CANCELLABLE,
    )
    return env


def wants_json(request: Request) -> bool:
    """Whether the client asked for JSON rather than a page."""
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def wants_fragment(request: Request) -> bool:
    """Whether the page's script asks for the live part only."""
    return request.query_params.get("fragment") == "1"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, Path | set | frozenset):
        return str(value) if isinstance(value, Path) else sorted(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def to_json(data: Any) -> bytes:
    """Dataclasses, timestamps and paths as JSON."""
    return json.dumps(data, default=_plain, separators=(",", ":")).encode()


def page(
    env: Environment,
    request: Request,
    template: str,
    data: dict[str, Any],
    *,
    status: int = 200,
    extra: dict[str, Any] | None = None,
) -> Response:
    """`data` as the page, its live fragment, or JSON; `extra` holds what only HTML needs."""
    if wants_json(request):
        return Response(to_json(data), status_code=status, media_type="application/json")
    name = f"_{template}" if wants_fragment(request) else template
    html = env.get_template(name).render(request=request, **data, **(extra or {}))
    return HTMLResponse(html, status_code=status)
