"""The console's view of the audit chain: a check resumes after the rows it covered."""

from __future__ import annotations

from sqlalchemy import Engine, select, update

from daemon.db import audit
from daemon.db.schema import AuditEvent


def _append(engine: Engine, *uids: str) -> None:
    for uid in uids:
        with engine.begin() as conn:
            audit.record(conn, audit.STUDY_RECEIVED, study_uid=uid)


def test_a_resumed_check_reads_only_new_rows_and_agrees_with_a_full_walk(engine: Engine) -> None:
    _append(engine, "1.1", "1.2")
    with engine.connect() as conn:
        first = audit.verify(conn)
    _append(engine, "1.3", "1.4", "1.5")
    with engine.connect() as conn:
        resumed = audit.verify(conn, since=first)
        full = audit.verify(conn)
    assert resumed == full and resumed.rows == 5 and resumed.intact
    assert first.last_id is not None and resumed.last_id == first.last_id + 3


def test_a_resumed_check_finds_a_broken_new_row(engine: Engine) -> None:
    _append(engine, "1.1")
    with engine.connect() as conn:
        first = audit.verify(conn)
    _append(engine, "1.2", "1.3")
    with engine.begin() as conn:
        last = conn.execute(select(AuditEvent.id).order_by(AuditEvent.id.desc())).scalar()
        conn.execute(update(AuditEvent).where(AuditEvent.id == last).values(study_uid="9.9"))
    with engine.connect() as conn:
        resumed = audit.verify(conn, since=first)
    assert not resumed.intact and resumed.broken_id == last and resumed.rows == 2
