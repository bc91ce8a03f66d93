"""Every query the console's pages run is answered from an index: each one is captured as the
pages run and explained by the database itself (SQLite's EXPLAIN QUERY PLAN; PostgreSQL's
EXPLAIN with sequential scans priced out, so a plan that still scans has no index to use).

The only walk allowed is the Studies page's, newest first along ix_studies_last_received_at,
which stops after a page of rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event

from tests.unit.http.console.conftest import Console, csrf_of, dead_commitment_report

# Tables that grow with every study; a scan of one is what the test forbids.
GROWING = (
    "studies",
    "series",
    "instances",
    "closed_versions",
    "mpps_steps",
    "mpps_step_studies",
    "mpps_step_series",
    "jobs",
    "results",
    "reports",
    "dispatches",
    "commitment_requests",
    "audit",
)
PAGING_WALK = re.compile(r"SCAN studies USING (COVERING )?INDEX ix_studies_last_received_at")


@pytest.fixture
def captured() -> Iterator[list[tuple[str, Any]]]:
    """Every SELECT any engine of this process runs while the fixture is active."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", record)
    yield seen
    event.remove(Engine, "before_cursor_execute", record)


def plan(engine: Engine, statement: str, parameters: Any) -> str:
    """The database's plan for one captured statement, as text."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
            return "\n".join(str(r[-1]) for r in rows)
        conn.exec_driver_sql("SET enable_seqscan = off")
        rows = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters).all()
        return "\n".join(str(r[0]) for r in rows)


def full_scans(engine: Engine, text: str) -> list[str]:
    """Plan lines that read a growing table from end to end."""
    tables = "|".join(GROWING)
    if engine.dialect.name == "sqlite":
        scan = re.compile(rf"\bSCAN ({tables})\b")
        return [ln for ln in text.splitlines() if scan.search(ln) and not PAGING_WALK.search(ln)]
    scan = re.compile(rf"Seq Scan on ({tables})\b")
    return [ln for ln in text.splitlines() if scan.search(ln)]


def pages(console: Console, commitment_job: int) -> list[str]:
    """One URL of each page and filter (the study page of a study with heatmaps, the job
    pages of an analysis and of a commitment report)."""
    uid = next(u for i, u in enumerate(console.filled.study_uids) if i % 10 == 5)
    filters = [f"state={s}" for s in ("failed", "receiving", "waiting", "verified", "reported")]
    filters += [
        "calling_ae=CT_ROOM3",
        "modality=MR",
        "received_from=2020-01-01",
        f"study_uid={uid}",
    ]
    return [
        "/console/",
        "/console/studies",
        "/console/studies?page=2",
        *(f"/console/studies?{f}" for f in filters),
        f"/console/studies/{uid}",
        f"/console/studies/{uid}/heatmaps/{uid}.8.0",
        f"/console/studies/{uid}/heatmaps/{uid}.8.0.png",
        "/console/failures",
        "/console/failures?page=2",
        "/console/jobs/1",
        f"/console/jobs/{commitment_job}",
    ]


def test_every_console_query_uses_an_index(
    console: Console, captured: list[tuple[str, Any]]
) -> None:
    commitment_job = dead_commitment_report(console)
    client = console.login("olga")
    client.get("/console/")  # a warm-up (the audit chain is walked once at start, then resumed)
    captured.clear()
    for url in pages(console, commitment_job):
        assert client.get(url).status_code == 200, url
    client.post("/console/jobs/1/cancel", data={"csrf": csrf_of(client)})
    statements = {s: p for s, p in captured if "alembic_version" not in s}
    assert len(statements) > 20
    problems = {}
    for statement, parameters in statements.items():
        text = plan(console.engine, statement, parameters)
        if full_scans(console.engine, text):
            problems[statement] = text
    assert problems == {}
