"""The console's routes: thin, as the DICOMweb ones are (parse, read or call the CLI's
function, answer). Each page runs its queries and its template in one worker thread."""

from __future__ import annotations

import datetime as dt
import logging
import re
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from daemon.http.auth import HttpRefusal
from daemon.http.console import documents, queries, views
from daemon.http.console.access import (
    COOKIE_PATH,
    EXPIRED,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Visitor,
    check_csrf,
    require_operator,
    same,
    visitor,
)
from daemon.http.console.render import page
from daemon.http.console.stages import STATES
from daemon.http.context import log_refusal, peer
from daemon.logsetup import kv
from daemon.spool import InvalidUID, check_uid
from daemon.status import job_detail, operator_cancel, operator_retry

if TYPE_CHECKING:
    from daemon.http.console.app import Console

log = logging.getLogger(__name__)

ROOT = "/console"
LOGIN = f"{ROOT}/login"
MAX_PAGE = 100_000
MAX_FIELD = 64
PNG_CACHE_SECONDS = 3600


def _console(request: Request) -> Console:
    from daemon.http.console.app import console

    return console(request)


def _who(request: Request, c: Console) -> Visitor:
    return visitor(request, c.sessions, c.users, c.ctx.auth.identify)


# What a Retry or Cancel says on the page it returns to (nothing else is echoed).
NOTICE = re.compile(r"job \d{1,12} (queued again|cancelled)")


def _notice(request: Request) -> str:
    notice = request.query_params.get("notice", "")
    return notice if NOTICE.fullmatch(notice) else ""


def _chrome(request: Request, who: Visitor, title: str) -> dict[str, Any]:
    """What every page's frame shows (not part of its JSON)."""
    return {
        "title": title,
        "who": who,
        "notice": _notice(request),
        "live_url": request.url.path + "?" + urlencode({**request.query_params, "fragment": "1"}),
    }


async def _render(
    request: Request,
    template: str,
    title: str,
    build: Callable[[Any, Visitor], dict[str, Any]],
) -> Response:
    """Identify the visitor, read, render: one worker thread, one read-only connection."""
    c = _console(request)

    def work() -> Response:
        who = _who(request, c)
        with c.reader.connect() as conn:
            data = build(conn, who)
        return page(c.templates, request, template, data, extra=_chrome(request, who, title))

    return await run_in_threadpool(work)


async def overview(request: Request) -> Response:
    c = _console(request)

    def build(conn: Any, _who: Visitor) -> dict[str, Any]:
        return views.overview(
            conn,
            c.ctx.settings,
            health=c.ctx.health,
            metrics=c.ctx.metrics,
            spool=c.ctx.ingestor.spool,
            models=c.models.entries(),
            chain=c.audit.check(conn),
        )

    return await _render(request, "overview.html", "Overview", build)


def _text(request: Request, name: str) -> str | None:
    value = request.query_params.get(name, "").strip()
    if len(value) > MAX_FIELD:
        raise HttpRefusal(400, f"{name}: at most {MAX_FIELD} characters")
    return value or None


def _day(request: Request, name: str) -> dt.date | None:
    value = _text(request, name)
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise HttpRefusal(400, f"{name}: not a date (YYYY-MM-DD): {value[:20]!r}") from exc


def _page_number(request: Request) -> int:
    value = request.query_params.get("page", "1")
    if not value.isdigit() or not 1 <= int(value) <= MAX_PAGE:
        raise HttpRefusal(400, f"page: a number from 1 to {MAX_PAGE}, not {value[:20]!r}")
    return int(value)


def study_filter(request: Request) -> queries.StudyFilter:
    """The Studies page's filter from its query string; 400 naming a bad field."""
    state = _text(request, "state")
    if state is not None and state not in STATES:
        raise HttpRefusal(400, f"state: one of {', '.join(STATES)}, not {state[:20]!r}")
    return queries.StudyFilter(
        state=state,
        calling_ae=_text(request, "calling_ae"),
        modality=_text(request, "modality"),
        received_from=_day(request, "received_from"),
        received_to=_day(request, "received_to"),
        study_uid=_text(request, "study_uid"),
        page=_page_number(request),
    )


async def studies(request: Request) -> Response:
    c = _console(request)
    chosen = study_filter(request)
    return await _render(
        request,
        "studies.html",
        "Studies",
        lambda conn, _who: views.studies(queries.study_page(conn, chosen, c.waits), c.waits),
    )


def _study_uid(request: Request) -> str:
    uid = request.path_params["study"]
    try:
        return check_uid(uid)
    except InvalidUID as exc:
        raise HttpRefusal(404, f"no study {uid[:80]!r}") from exc


async def study(request: Request) -> Response:
    c = _console(request)
    uid = _study_uid(request)
    chosen_sr = _text(request, "sr")

    def build(conn: Any, _who: Visitor) -> dict[str, Any]:
        record = queries.study_record(conn, uid, c.waits)
        if record is None:
            raise HttpRefusal(404, f"no study {uid}")
        return views.study(record, c.ctx.settings, c.waits, chosen_sr)

    return await _render(request, "study.html", f"Study {uid}", build)


def _heatmap_file(conn: Any, request: Request) -> tuple[str, str, str]:
    uid = _study_uid(request)
    sop = request.path_params["sop"]
    path = queries.heatmap_path(conn, uid, sop)
    if path is None:
        raise HttpRefusal(404, f"no heatmap {sop[:80]!r} in study {uid}")
    return uid, sop, path


async def heatmap(request: Request) -> Response:
    def build(conn: Any, _who: Visitor) -> dict[str, Any]:
        uid, sop, path = _heatmap_file(conn, request)
        return {"study_uid": uid, "sop_instance_uid": sop,
                "caption": documents.heatmap_caption(path)}  # fmt: skip

    return await _render(request, "heatmap.html", "Heatmap", build)


async def heatmap_png(request: Request) -> Response:
    """The heatmap Secondary Capture rendered to PNG on the server."""
    c = _console(request)

    def work() -> Response:
        _who(request, c)
        with c.reader.connect() as conn:
            _uid, _sop, path = _heatmap_file(conn, request)
        try:
            data = documents.png(path)
        except documents.Unreadable as exc:
            raise HttpRefusal(410, f"heatmap file unreadable: {exc}") from exc
        # Private: it shows patient anatomy; its UID names fixed content, so keep it a while.
        headers = {"Cache-Control": f"private, max-age={PNG_CACHE_SECONDS}"}
        return Response(data, media_type="image/png", headers=headers)

    return await run_in_threadpool(work)


async def failures(request: Request) -> Response:
    number = _page_number(request)
    return await _render(
        request,
        "failures.html",
        "Failures",
        lambda conn, _who: {"failures": queries.failures(conn, number)},
    )


async def job(request: Request) -> Response:
    job_id = int(request.path_params["job_id"])

    def build(conn: Any, _who: Visitor) -> dict[str, Any]:
        shown = job_detail(conn, job_id)
        if shown is None:
            raise HttpRefusal(404, f"no job {job_id}")
        return views.job(shown)

    return await _render(request, "job.html", f"Job {job_id}", build)


def _back(form: FormData) -> str:
    """Where a form's answer sends the browser: a console page it names, else Failures."""
    back = str(form.get("back") or "")
    if back.startswith(f"{ROOT}/") and not back.startswith("//") and "\\" not in back:
        return back.split("#")[0]
    return f"{ROOT}/failures"


def _with_notice(url: str, notice: str) -> str:
    base, _, query = url.partition("?")
    kept = [p for p in query.split("&") if p and not p.startswith(("notice=", "fragment="))]
    return f"{base}?{'&'.join([*kept, urlencode({'notice': notice})])}"


async def _act(request: Request, verb: str, action: Callable[..., bool]) -> Response:
    """Retry or cancel a job exactly as `pacs-ai jobs retry|cancel` does (audited)."""
    c = _console(request)
    job_id = int(request.path_params["job_id"])
    form = await request.form()

    def work() -> Response:
        who = _who(request, c)
        check_csrf(who, form.get("csrf"))  # type: ignore[arg-type]
        require_operator(who)
        with c.reader.connect() as conn:
            if not queries.job_exists(conn, job_id):
                raise HttpRefusal(404, f"no job {job_id}")
        by = f"console:{who.name}"
        if not action(c.ctx.settings, job_id, by=by):
            raise HttpRefusal(409, f"job {job_id}: nothing to {verb} (see its state)")
        log.info(f"job {verb} from the console", extra=kv(job=job_id, by=by, peer=peer(request)))
        done = "queued again" if verb == "retry" else "cancelled"
        return RedirectResponse(_with_notice(_back(form), f"job {job_id} {done}"), 303)

    return await run_in_threadpool(work)


async def retry(request: Request) -> Response:
    return await _act(request, "retry", operator_retry)


async def cancel(request: Request) -> Response:
    return await _act(request, "cancel", operator_cancel)


def _next(value: str | None) -> str:
    """Where to go after logging in: a console page, never another site."""
    if value and value.startswith(f"{ROOT}/") and not value.startswith("//") and "\\" not in value:
        return value
    return f"{ROOT}/"


def _login_page(request: Request, status: int, message: str, next_url: str) -> Response:
    c = _console(request)
    token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
    data = {"next": next_url, "message": message, "csrf": token}
    response = page(c.templates, request, "login.html", data, status=status,
                    extra={"title": "Log in", "who": None, "notice": ""})  # fmt: skip
    response.set_cookie(
        LOGIN_COOKIE, token, path=LOGIN, httponly=True, samesite="strict",
        secure=_secure(request),
    )  # fmt: skip
    return response


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or _console(request).ctx.settings.http.tls is not None


async def login_form(request: Request) -> Response:
    why = request.query_params.get("why")
    message = "Your session has expired; please log in again." if why == EXPIRED else ""
    return _login_page(request, 200, message, _next(request.query_params.get("next")))


async def login(request: Request) -> Response:
    c = _console(request)
    form = await request.form()
    next_url = _next(str(form.get("next") or ""))
    cookie = request.cookies.get(LOGIN_COOKIE)
    if cookie is None or not same(str(form.get("csrf") or ""), cookie):
        raise HttpRefusal(403, "forged or missing CSRF token")
    name = str(form.get("user") or "")[:MAX_FIELD]
    password = str(form.get("password") or "")
    user = await run_in_threadpool(c.users.check, name, password)
    if user is None:
        log_refusal(request, HttpRefusal(401, f"wrong user name or password for {name!r}"))
        return _login_page(request, 401, "Wrong user name or password.", next_url)
    token = await run_in_threadpool(c.sessions.open, user)
    log.info("console login", extra=kv(user=user.name, role=user.role, peer=peer(request)))
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(
        SESSION_COOKIE, token, max_age=c.sessions.seconds, path=COOKIE_PATH, httponly=True,
        samesite="strict", secure=_secure(request),
    )  # fmt: skip
    response.delete_cookie(LOGIN_COOKIE, path=LOGIN)
    return response


async def logout(request: Request) -> Response:
    c = _console(request)
    form = await request.form()

    def work() -> None:
        who = _who(request, c)
        check_csrf(who, form.get("csrf"))  # type: ignore[arg-type]
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            c.sessions.close(token)
        log.info("console logout", extra=kv(user=who.name, peer=peer(request)))

    await run_in_threadpool(work)
    response = RedirectResponse(LOGIN, status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


def error_page(request: Request, status: int, reason: str) -> Response:
    """A refusal as a page with the console's frame."""
    c = _console(request)
    return page(c.templates, request, "error.html", {"status": status, "reason": reason},
                status=status, extra={"title": f"{status}", "who": None, "notice": ""})  # fmt: skip


ROUTES: list[tuple[str, Callable[[Request], Any], list[str]]] = [
    ("/", overview, ["GET"]),
    ("/studies", studies, ["GET"]),
    ("/studies/{study}", study, ["GET"]),
    ("/studies/{study}/heatmaps/{sop}.png", heatmap_png, ["GET"]),
    ("/studies/{study}/heatmaps/{sop}", heatmap, ["GET"]),
    ("/failures", failures, ["GET"]),
    ("/jobs/{job_id:int}", job, ["GET"]),
    ("/jobs/{job_id:int}/retry", retry, ["POST"]),
    ("/jobs/{job_id:int}/cancel", cancel, ["POST"]),
    ("/login", login_form, ["GET"]),
    ("/login", login, ["POST"]),
    ("/logout", logout, ["POST"]),
]
