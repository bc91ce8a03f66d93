"""Who gets into the console and what they may do: users, sessions, tokens, CSRF."""

from __future__ import annotations

import datetime as dt
import hashlib

import httpx
import pytest
from sqlalchemy import select, update

from daemon.db import audit
from daemon.db.schema import AuditEvent, ConsoleSession, Job
from daemon.http.console.access import SESSION_COOKIE
from tests.unit.http.console.conftest import (
    Console,
    StartConsole,
    csrf_of,
    login,
    refusals,
)


def dead_job(console: Console) -> int:
    with console.engine.connect() as conn:
        return int(conn.execute(select(Job.id).where(Job.state == "dead").limit(1)).scalar_one())


def state_of(console: Console, job_id: int) -> str:
    with console.engine.connect() as conn:
        return str(conn.execute(select(Job.state).where(Job.id == job_id)).scalar_one())


def test_a_visit_without_a_session_goes_to_the_login_form_and_back(console: Console) -> None:
    client = console.client()
    first = client.get("/console/studies?state=failed")
    assert first.status_code == 303
    assert first.headers["location"] == "/console/login?next=%2Fconsole%2Fstudies%3Fstate%3Dfailed"
    form = client.get(first.headers["location"])
    assert 'name="next" value="/console/studies?state=failed"' in form.text
    assert console.client().get("/").headers["location"] == "/console/"


def test_login_opens_a_session_kept_only_as_a_hash_in_a_strict_http_only_cookie(
    console: Console,
) -> None:
    client = console.client()
    answer = login(client, "olga", "operator-password")
    assert answer.status_code == 303 and answer.headers["location"] == "/console/"
    cookie = next(h for h in answer.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain HTTP here; with [http.tls] it is Secure
    token = client.cookies[SESSION_COOKIE]
    with console.engine.connect() as conn:
        row = conn.execute(select(ConsoleSession)).one()
    assert row.id == hashlib.sha256(token.encode()).hexdigest() and token not in row.id
    assert (row.user_name, row.role) == ("olga", "operator")
    page = client.get("/console/")
    assert page.status_code == 200 and "olga · operator" in page.text


def test_a_wrong_password_is_401_logged_once_without_the_password(
    console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    client = console.client()
    answer = login(client, "olga", "guessed-password")
    assert answer.status_code == 401
    assert "Wrong user name or password" in answer.text
    assert SESSION_COOKIE not in client.cookies
    lines = refusals(caplog)
    assert len(lines) == 1 and "olga" in lines[0] and "guessed-password" not in caplog.text
    assert login(client, "nobody", "whatever-it-is").status_code == 401


@pytest.mark.parametrize("csrf", ["", "forged-token"], ids=["missing", "forged"])
def test_a_login_form_without_its_csrf_token_is_403(
    console: Console, caplog: pytest.LogCaptureFixture, csrf: str
) -> None:
    client = console.client()
    answer = login(client, "olga", "operator-password", csrf=csrf)
    assert answer.status_code == 403 and "CSRF" in answer.text
    assert SESSION_COOKIE not in client.cookies
    assert len(refusals(caplog)) == 1


@pytest.mark.parametrize("csrf", ["", "forged-token"], ids=["missing", "forged"])
def test_a_retry_without_the_session_csrf_token_is_403_and_changes_nothing(
    console: Console, caplog: pytest.LogCaptureFixture, csrf: str
) -> None:
    client = console.login("olga")
    job_id = dead_job(console)
    caplog.clear()
    answer = client.post(f"/console/jobs/{job_id}/retry", data={"csrf": csrf})
    assert answer.status_code == 403 and "CSRF" in answer.text
    assert state_of(console, job_id) == "dead"
    assert len(refusals(caplog)) == 1


def test_a_viewer_may_look_but_not_retry(
    console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    client = console.login("victor")
    failures = client.get("/console/failures")
    assert failures.status_code == 200 and "victor · viewer" in failures.text
    assert "data-retry" not in failures.text  # no buttons for a viewer
    job_id = dead_job(console)
    caplog.clear()
    answer = client.post(
        f"/console/jobs/{job_id}/retry", data={"csrf": csrf_of(client, "/console/")}
    )
    assert answer.status_code == 403
    assert state_of(console, job_id) == "dead"
    assert len(refusals(caplog)) == 1


def test_an_operator_retry_is_the_cli_retry_audited_with_the_user(console: Console) -> None:
    client = console.login("olga")
    job_id = dead_job(console)
    answer = client.post(
        f"/console/jobs/{job_id}/retry",
        data={"csrf": csrf_of(client), "back": "/console/failures"},
    )
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/console/failures?notice=")
    assert f"job {job_id} queued again" in client.get(answer.headers["location"]).text
    assert "call 555" not in client.get("/console/failures?notice=call+555+now").text
    assert state_of(console, job_id) == "queued"
    with console.engine.connect() as conn:
        event = conn.execute(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(1)).one()
        assert audit.verify(conn).intact
    assert (event.event, event.detail["job"], event.detail["by"]) == (
        audit.JOB_RETRIED,
        job_id,
        "console:olga",
    )
    again = client.post(f"/console/jobs/{job_id}/retry", data={"csrf": csrf_of(client)})
    assert again.status_code == 409  # queued now: nothing to retry
    cancelled = client.post(f"/console/jobs/{job_id}/cancel", data={"csrf": csrf_of(client)})
    assert cancelled.status_code == 303 and state_of(console, job_id) == "cancelled"


def test_unknown_and_malformed_job_ids_are_404(console: Console) -> None:
    client = console.login("olga")
    csrf = csrf_of(client)
    assert client.post("/console/jobs/999999/retry", data={"csrf": csrf}).status_code == 404
    assert client.post("/console/jobs/abc/retry", data={"csrf": csrf}).status_code == 404
    assert client.get("/console/jobs/999999").status_code == 404


def test_an_expired_session_is_sent_to_log_in_again_logged_once(
    console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    client = console.login("olga")
    with console.engine.begin() as conn:
        conn.execute(
            update(ConsoleSession).values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(1))
        )
    caplog.clear()
    page = client.get("/console/studies")
    assert page.status_code == 303
    assert "why=session+expired" in page.headers["location"]
    assert "expired" in client.get(page.headers["location"]).text
    assert len(refusals(caplog)) == 1 and "session expired" in refusals(caplog)[0]
    fragment = client.get("/console/studies?fragment=1")
    assert fragment.status_code == 401  # the page's script then goes to the login form
    posted = client.post(f"/console/jobs/{dead_job(console)}/retry", data={"csrf": "x"})
    assert posted.status_code == 401


def test_sessions_last_session_minutes(start_console: StartConsole) -> None:
    console = start_console(studies=5, session_minutes=90)
    client = console.login("olga")
    with console.engine.connect() as conn:
        row = conn.execute(select(ConsoleSession)).one()
    assert row.expires_at - row.created_at == dt.timedelta(minutes=90)
    cookie = client.cookies.jar
    assert any(c.name == SESSION_COOKIE for c in cookie)


def test_logout_ends_the_session(console: Console) -> None:
    client = console.login("olga")
    answer = client.post("/console/logout", data={"csrf": csrf_of(client, "/console/")})
    assert answer.status_code == 303 and answer.headers["location"] == "/console/login"
    with console.engine.connect() as conn:
        assert conn.execute(select(ConsoleSession)).all() == []
    assert client.get("/console/").status_code == 303


def test_scripts_read_and_act_with_bearer_tokens_without_csrf(console: Console) -> None:
    read = {**console.face.auth("read"), "Accept": "application/json"}
    overview = httpx.get(f"{console.face.url}/console/", headers=read)
    assert overview.status_code == 200 and "queue" in overview.json()["db"]
    job_id = dead_job(console)
    refused = httpx.post(f"{console.face.url}/console/jobs/{job_id}/retry", headers=read)
    assert refused.status_code == 403
    operator = console.face.auth("operator")
    done = httpx.post(f"{console.face.url}/console/jobs/{job_id}/retry", headers=operator)
    assert done.status_code == 303 and state_of(console, job_id) == "queued"
    store = httpx.get(f"{console.face.url}/console/", headers=console.face.auth("store"))
    assert store.status_code == 403
    wrong = httpx.get(f"{console.face.url}/console/", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
