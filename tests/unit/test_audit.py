"""The audit trail: a hash chain that any edit or deletion of a row breaks visibly."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete, select, update

from daemon.cli import main
from daemon.db import audit
from daemon.db.schema import AuditEvent


def _append(engine: Engine, n: int) -> None:
    for i in range(n):
        with engine.begin() as conn:
            audit.record(conn, audit.ANALYSED, study_uid=f"1.2.{i}", model="cnn", job=i)


def _ids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(select(AuditEvent.id).order_by(AuditEvent.id)).scalars())


def test_first_row_links_to_sixty_four_zeros(sqlite_engine: Engine) -> None:
    _append(sqlite_engine, 1)
    with sqlite_engine.connect() as conn:
        row = conn.execute(select(AuditEvent)).one()
    assert row.prev_hash == "0" * 64
    assert row.hash == audit.row_hash(
        row.created_at, row.event, row.study_uid, row.detail, row.prev_hash
    )


def test_each_row_carries_the_hash_of_the_one_before(sqlite_engine: Engine) -> None:
    _append(sqlite_engine, 3)
    with sqlite_engine.connect() as conn:
        rows = conn.execute(select(AuditEvent).order_by(AuditEvent.id)).all()
    assert [r.prev_hash for r in rows[1:]] == [r.hash for r in rows[:-1]]


def test_hash_does_not_depend_on_detail_key_order() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
    one = audit.row_hash(when, "e", "1.2", {"a": 1, "b": [1, 2]}, "0" * 64)
    other = audit.row_hash(when, "e", "1.2", {"b": [1, 2], "a": 1}, "0" * 64)
    assert one == other


def test_hash_covers_time_event_study_detail_and_link() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    base = audit.row_hash(when, "e", "1.2", {"a": 1}, "0" * 64)
    assert base != audit.row_hash(
        when + dt.timedelta(microseconds=1), "e", "1.2", {"a": 1}, "0" * 64
    )
    assert base != audit.row_hash(when, "f", "1.2", {"a": 1}, "0" * 64)
    assert base != audit.row_hash(when, "e", "1.3", {"a": 1}, "0" * 64)
    assert base != audit.row_hash(when, "e", "1.2", {"a": 2}, "0" * 64)
    assert base != audit.row_hash(when, "e", "1.2", {"a": 1}, "1" * 64)


def test_untouched_chain_is_intact(sqlite_engine: Engine) -> None:
    _append(sqlite_engine, 5)
    with sqlite_engine.connect() as conn:
        check = audit.verify(conn)
    assert check.intact
    assert str(check) == "audit chain intact: 5 rows"


def test_empty_chain_is_intact(sqlite_engine: Engine) -> None:
    with sqlite_engine.connect() as conn:
        assert str(audit.verify(conn)) == "audit chain intact: 0 rows"


def test_row_edited_by_hand_is_named(sqlite_engine: Engine) -> None:
    _append(sqlite_engine, 4)
    target = _ids(sqlite_engine)[2]
    with sqlite_engine.begin() as conn:
        conn.execute(
            update(AuditEvent).where(AuditEvent.id == target).values(detail={"model": "other"})
        )
    with sqlite_engine.connect() as conn:
        check = audit.verify(conn)
    assert not check.intact
    assert str(check) == f"audit row {target} is broken: hash does not match its content"


def test_row_rehashed_after_an_edit_breaks_the_next_link(sqlite_engine: Engine) -> None:
    _append(sqlite_engine, 3)
    first, second, third = _ids(sqlite_engine)
    with sqlite_engine.begin() as conn:
        row = conn.execute(select(AuditEvent).where(AuditEvent.id == second)).one()
        forged = audit.row_hash(row.created_at, row.event, "9.9", row.detail, row.prev_hash)
        conn.execute(
            update(AuditEvent).where(AuditEvent.id == second).values(study_uid="9.9", hash=forged)
        )
    with sqlite_engine.connect() as conn:
        check = audit.verify(conn)
    assert str(check) == f"audit row {third} is broken: prev_hash does not match row {second}"


def test_deleted_row_is_found_at_the_row_after_it(sqlite_engine: Engine) -> None:
    _append(sqlite_engine, 4)
    ids = _ids(sqlite_engine)
    with sqlite_engine.begin() as conn:
        conn.execute(delete(AuditEvent).where(AuditEvent.id == ids[1]))
    with sqlite_engine.connect() as conn:
        check = audit.verify(conn)
    assert check.broken_id == ids[2]
    assert check.reason == f"prev_hash does not match row {ids[0]}"


def test_deleted_first_row_is_found(sqlite_engine: Engine) -> None:
    _append(sqlite_engine, 2)
    ids = _ids(sqlite_engine)
    with sqlite_engine.begin() as conn:
        conn.execute(delete(AuditEvent).where(AuditEvent.id == ids[0]))
    with sqlite_engine.connect() as conn:
        check = audit.verify(conn)
    assert str(check) == (
        f"audit row {ids[1]} is broken: prev_hash does not match the start of the chain"
    )


def test_record_rolls_back_with_the_callers_transaction(sqlite_engine: Engine) -> None:
    class Boom(Exception):
        pass

    try:
        with sqlite_engine.begin() as conn:
            audit.record(conn, audit.ANALYSED, study_uid="1.2")
            raise Boom
    except Boom:
        pass
    assert _ids(sqlite_engine) == []


def test_study_is_audited_as_received_once(sqlite_engine: Engine) -> None:
    with sqlite_engine.begin() as conn:
        assert audit.record_studies_received(conn, ["1.2", "1.3", "1.2"]) == 2
    with sqlite_engine.begin() as conn:
        assert audit.record_studies_received(conn, ["1.2", "1.4"]) == 1
    with sqlite_engine.connect() as conn:
        rows = conn.execute(
            select(AuditEvent.study_uid).where(AuditEvent.event == audit.STUDY_RECEIVED)
        ).scalars()
        assert sorted(rows) == ["1.2", "1.3", "1.4"]
        assert audit.verify(conn).intact


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "pacs-ai.toml"
    path.write_text(f'[storage]\nspool_dir = "{tmp_path / "spool"}"\ndatabase_url = "{url}"\n')
    return path


def test_audit_verify_command_reports_an_intact_chain(
    sqlite_engine: Engine, sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _append(sqlite_engine, 2)
    assert main(["audit", "verify", "--config", str(_config(tmp_path, sqlite_url))]) == 0
    assert capsys.readouterr().out.strip() == "audit chain intact: 2 rows"


def test_audit_verify_command_names_the_broken_row_and_fails(
    sqlite_engine: Engine, sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _append(sqlite_engine, 2)
    target = _ids(sqlite_engine)[0]
    with sqlite_engine.begin() as conn:
        conn.execute(update(AuditEvent).where(AuditEvent.id == target).values(event="forged"))
    assert main(["audit", "verify", "--config", str(_config(tmp_path, sqlite_url))]) == 1
    out = capsys.readouterr().out.strip()
    assert out == f"audit row {target} is broken: hash does not match its content"
