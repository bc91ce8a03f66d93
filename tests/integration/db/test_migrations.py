"""`alembic upgrade head` builds exactly the schema the models declare, on both engines."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError

from daemon.db import migrate, queue
from daemon.db.engine import SQLITE_BUSY_TIMEOUT_MS, make_engine
from daemon.db.schema import Base, Job, MppsStep, MppsStepSeries, MppsStepStudy


@pytest.fixture
def bare_engine(db_url: str) -> Iterator[Engine]:
    """An engine on an empty database, never upgraded."""
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def schema_diff(engine: Engine) -> list[object]:
    """What autogenerate would change to make the database match the models."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def test_upgrade_head_builds_exactly_the_declared_schema(bare_engine: Engine) -> None:
    migrate.upgrade(bare_engine)
    assert schema_diff(bare_engine) == []
    tables = set(inspect(bare_engine).get_table_names())
    assert tables == set(Base.metadata.tables) | {"alembic_version"}


def test_alembic_command_with_only_a_url_builds_the_same_schema(
    db_url: str, bare_engine: Engine
) -> None:
    command.upgrade(migrate.alembic_config(db_url), "head")
    assert migrate.is_at_head(bare_engine)
    assert schema_diff(bare_engine) == []


def test_empty_database_is_not_at_head_until_upgraded(bare_engine: Engine) -> None:
    assert migrate.current_revision(bare_engine) is None
    assert not migrate.is_at_head(bare_engine)
    migrate.upgrade(bare_engine)
    assert migrate.current_revision(bare_engine) == migrate.head_revision()
    assert migrate.is_at_head(bare_engine)


def test_second_upgrade_is_a_no_op_that_keeps_the_data(bare_engine: Engine) -> None:
    migrate.upgrade(bare_engine)
    with bare_engine.begin() as conn:
        job_id = queue.enqueue(conn, "analyse", "study-1", max_attempts=3)
    migrate.upgrade(bare_engine)
    assert migrate.is_at_head(bare_engine)
    assert schema_diff(bare_engine) == []
    with bare_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Job)).scalar_one() == 1
        assert conn.execute(select(Job.id)).scalar_one() == job_id
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    assert versions == [(migrate.head_revision(),)]


def test_upgrading_to_0005_links_each_existing_mpps_step_to_its_study_and_series(
    db_url: str, bare_engine: Engine
) -> None:
    command.upgrade(migrate.alembic_config(db_url), "0004")
    now = dt.datetime.now(dt.UTC)
    performed = {"series": ["1.2.3", "1.2.4"], "instances": [["1.2.3", "1.2.840.1", "1.2.5"]]}
    with bare_engine.begin() as conn:
        for uid, done in (("1.9.1", performed), ("1.9.2", {})):
            conn.execute(
                insert(MppsStep.__table__).values(
                    sop_instance_uid=uid, calling_ae="CT01", study_uid="1.9", state="COMPLETED",
                    performed=done, created_at=now, updated_at=now,
                )
            )
    migrate.upgrade(bare_engine)
    with bare_engine.connect() as conn:
        series = conn.execute(
            select(MppsStep.sop_instance_uid, MppsStepSeries.series_uid)
            .join(MppsStepSeries, MppsStepSeries.step_id == MppsStep.id)
            .order_by(MppsStepSeries.series_uid)
        ).all()
        studies = conn.execute(
            select(MppsStep.sop_instance_uid, MppsStepStudy.study_uid)
            .join(MppsStepStudy, MppsStepStudy.step_id == MppsStep.id)
            .order_by(MppsStep.sop_instance_uid)
        ).all()
    assert [tuple(r) for r in series] == [("1.9.1", "1.2.3"), ("1.9.1", "1.2.4")]
    assert [tuple(r) for r in studies] == [("1.9.1", "1.9"), ("1.9.2", "1.9")]


def test_sqlite_connections_are_wal_with_foreign_keys_and_a_busy_timeout(
    sqlite_engine: Engine,
) -> None:
    with sqlite_engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
        busy = conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
    assert busy > 0
    assert busy == SQLITE_BUSY_TIMEOUT_MS


def test_sqlite_enforces_foreign_keys(sqlite_engine: Engine) -> None:
    with pytest.raises(IntegrityError), sqlite_engine.begin() as conn:
        queue.enqueue(conn, "analyse", "orphan", max_attempts=1, study_id=999)
