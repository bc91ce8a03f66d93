"""A console per test: the real HTTP server in process, a real database (SQLite and
PostgreSQL) filled with studies at every stage, two users and a token per role."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher
from pydicom.uid import generate_uid
from sqlalchemy import Engine

from daemon.db import commitments, queue
from daemon.db.schema import CommitmentState
from daemon.logsetup import LineFormatter
from tests.console_rows import CT, Documents, Filled, fill, write_documents
from tests.unit.http.conftest import Face, StartFace

# Cheap hashes for tests (a verification costs what its hash's parameters say).
HASHER = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
PASSWORDS = {"olga": "operator-password", "victor": "viewer-password"}
ROLES = {"olga": "operator", "victor": "read"}
STUDIES = 120
PER_STUDY = 3
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def users() -> list[dict[str, str]]:
    """`[[http.users]]`: olga the operator, victor the viewer."""
    return [
        {"name": n, "password_hash": HASHER.hash(p), "role": ROLES[n]} for n, p in PASSWORDS.items()
    ]


@dataclasses.dataclass
class Console:
    """A running console over filled rows."""

    face: Face
    filled: Filled
    docs: Documents

    @property
    def engine(self) -> Engine:
        return self.face.engine

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.face.url, **kwargs)

    def login(self, user: str, password: str | None = None) -> httpx.Client:
        """A client signed in as `user` (it keeps the session cookie)."""
        client = self.client()
        answer = login(client, user, PASSWORDS[user] if password is None else password)
        assert answer.status_code == 303, answer.text
        return client

    def study(self, stage: str) -> str:
        """A study filled at `stage`."""
        return next(uid for uid, s in self.filled.stages.items() if s == stage)


def login(
    client: httpx.Client, user: str, password: str, csrf: str | None = None
) -> httpx.Response:
    """Fill the login form as a browser does (its CSRF token from the form and cookie)."""
    form = client.get("/console/login")
    token = csrf if csrf is not None else CSRF.search(form.text).group(1)  # type: ignore[union-attr]
    return client.post(
        "/console/login",
        data={"user": user, "password": password, "csrf": token, "next": "/console/"},
    )


def csrf_of(client: httpx.Client, path: str = "/console/failures") -> str:
    """The session's CSRF token, as its pages' forms carry it."""
    match = CSRF.search(client.get(path).text)
    assert match, f"no form on {path}"
    return match.group(1)


StartConsole = Callable[..., Console]


@pytest.fixture
def start_console(start_face: StartFace, tmp_path: Path) -> StartConsole:
    """start_console(**[http] settings) -> a Console over STUDIES filled studies."""

    def start(studies: int = STUDIES, **http: Any) -> Console:
        http.setdefault("users", users())
        face = start_face(**http)
        docs = write_documents(tmp_path / "docs")
        filled = fill(face.engine, docs, studies=studies, instances_per_study=PER_STUDY, days=1)
        return Console(face, filled, docs)

    return start


@pytest.fixture
def console(start_console: StartConsole) -> Console:
    return start_console()


def dead_commitment_report(console: Console, calling_ae: str = "CT_ROOM3") -> int:
    """A modality's Storage Commitment request whose report job died, as a worker leaves
    them (the job dead, the request marked dead); the job's id."""
    engine = console.engine
    with engine.begin() as conn:
        request_id, key, _ = commitments.record_request(
            conn,
            generate_uid(),
            calling_ae,
            [(CT, generate_uid())],
            max_attempts=1,
            first_attempt_seconds=0,
        )
    job = queue.claim_key(engine, key, "test-worker", lease_seconds=60)
    assert job is not None
    error = f"no association to {calling_ae}: connection refused"
    queue.fail(engine, job.id, "test-worker", error, queue.RetryPolicy())
    with engine.begin() as conn:
        commitments.mark(conn, request_id, CommitmentState.DEAD, error)
    return job.id


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The refusal lines logged, as the service writes them."""
    formatter = LineFormatter(journald=False)
    return [
        formatter.format(r)
        for r in caplog.records
        if r.getMessage() == "http request refused" and r.levelno >= logging.INFO
    ]
