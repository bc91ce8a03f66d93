"""`alembic upgrade head` builds exactly the schema the models declare, on both engines."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from daemon.db import migrate, queue
from daemon.db.engine import SQLITE_BUSY_TIMEOUT_MS, make_engine
from daemon.db.schema import Base, Job


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
