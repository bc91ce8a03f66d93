"""The console's app: its state, routes, security headers and refusal pages."""

from __future__ import annotations

import dataclasses
import logging
import threading
from urllib.parse import urlencode

from jinja2 import Environment
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.assemble.rules import Waits
from daemon.db import audit
from daemon.http.console import pages
from daemon.http.console.access import NO_SESSION, LoginNeeded, Sessions, Users
from daemon.http.console.manifests import ModelShelf
from daemon.http.console.render import SECURITY_HEADERS, environment, wants_fragment, wants_json
from daemon.http.context import STATE_KEY, HttpContext, log_refusal
from daemon.logsetup import kv

log = logging.getLogger(__name__)

CONSOLE_KEY = "console"


class AuditWatch:
    """The audit chain's state for the Overview: walked once in the background when the
    console starts, then, at each view, only the rows added since."""

    def __init__(self, reader: Engine) -> None:
        self._lock = threading.Lock()
        self._check: audit.ChainCheck | None = None
        threading.Thread(target=self._first_walk, args=(reader,), daemon=True).start()

    def _first_walk(self, reader: Engine) -> None:
        try:
            with reader.connect() as conn:
                self.check(conn, wait=True)
        except SQLAlchemyError as exc:
            log.warning("audit chain not checked", extra=kv(error=str(exc.orig or exc)[:200]))

    def check(self, conn: Connection, *, wait: bool = False) -> audit.ChainCheck | None:
        """The chain checked up to its newest row (a broken chain stays broken); None while
        the first walk runs (a page does not wait for it)."""
        if not self._lock.acquire(blocking=wait):
            return self._check
        try:
            if self._check is None or self._check.intact:
                self._check = audit.verify(conn, since=self._check)
            return self._check
        finally:
            self._lock.release()


@dataclasses.dataclass(frozen=True)
class Console:
    """What every console page reaches: the service's context and the console's own parts."""

    ctx: HttpContext
    reader: Engine
    users: Users
    sessions: Sessions
    templates: Environment
    audit: AuditWatch
    models: ModelShelf
    waits: Waits  # the assembler's pauses: what a waiting study waits for

    @property
    def writer(self) -> Engine:
        return self.ctx.ingestor.engine


def console(request: Request) -> Console:
    """The console a request reached."""
    state: Console = getattr(request.app.state, CONSOLE_KEY)
    return state


class _SecurityHeaders:
    """Adds SECURITY_HEADERS to every console response (static files included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message.setdefault("headers", [])
                for key, value in SECURITY_HEADERS.items():
                    if key.lower().encode() not in names:
                        message["headers"].append((key.lower().encode(), value.encode()))
            await send(message)

        await self.app(scope, receive, with_headers)


def _login_redirect(request: Request, why: str) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    query = {"next": target} | ({"why": why} if why != NO_SESSION else {})
    return RedirectResponse(f"{pages.LOGIN}?{urlencode(query)}", status_code=303)


async def refused(request: Request, exc: Exception) -> Response:
    """A refusal as one log line and a page: browsers without a session go to the login form."""
    assert isinstance(exc, HTTPException)
    page_view = request.method == "GET" and not wants_json(request)
    if isinstance(exc, LoginNeeded) and page_view and not wants_fragment(request):
        # Opening the console without a session is how every visit starts: not a warning.
        level = logging.INFO if exc.detail == NO_SESSION else logging.WARNING
        log_refusal(request, exc, level)
        return _login_redirect(request, exc.detail)
    log_refusal(request, exc)
    if not page_view or wants_fragment(request):
        return PlainTextResponse(
            exc.detail + "\n", status_code=exc.status_code, headers=exc.headers
        )
    return pages.error_page(request, exc.status_code, exc.detail)


def build(ctx: HttpContext) -> Starlette:
    """The console app for one service's HTTP context."""
    settings = ctx.settings
    reader = ctx.reader or ctx.ingestor.engine
    state = Console(
        ctx=ctx,
        reader=reader,
        users=Users(settings.http),
        sessions=Sessions(ctx.ingestor.engine, reader, settings.http.session_minutes),
        templates=environment(),
        audit=AuditWatch(reader),
        models=ModelShelf(
            settings.models.dir, frozenset(settings.models.shadow), settings.models.device
        ),
        waits=Waits.from_settings(settings),
    )
    app = Starlette(
        routes=[
            *[Route(path, endpoint, methods=methods) for path, endpoint, methods in pages.ROUTES],
            Mount("/static", StaticFiles(packages=[("daemon.http.console", "static")])),
        ],
        middleware=[Middleware(_SecurityHeaders)],
        exception_handlers={HTTPException: refused},
    )
    setattr(app.state, STATE_KEY, ctx)
    setattr(app.state, CONSOLE_KEY, state)
    return app
