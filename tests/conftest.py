"""Fixtures every suite shares: free ports, fresh spools, real databases at head."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from daemon.db import migrate
from daemon.db.engine import make_engine
from tests.peers import free_port

PG_ADMIN_URL = os.environ.get("PACSAI_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def postgres_available() -> bool:
    """Whether the PostgreSQL server answers; under CI its absence is a failure, not a skip."""
    engine = make_engine(PG_ADMIN_URL)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - any connection error means "not available"
        return False
    finally:
        engine.dispose()


def require_postgres() -> None:
    """Skip without PostgreSQL locally; fail under CI."""
    if postgres_available():
        return
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required under CI and is not reachable at {PG_ADMIN_URL}")
    pytest.skip("PostgreSQL not reachable")


def new_pg_schema_url() -> tuple[str, str]:
    """Create a fresh schema and return (url whose search_path is it, schema name)."""
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = make_engine(PG_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    return f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}", schema


def drop_pg_schema(schema: str) -> None:
    admin = make_engine(PG_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    admin.dispose()


_PYNETDICOM_FLAGS = (
    "UNRESTRICTED_STORAGE_SERVICE",
    "STORE_RECV_CHUNKED_DATASET",
    "LOG_REQUEST_IDENTIFIERS",
    "LOG_RESPONSE_IDENTIFIERS",
    "LOG_HANDLER_LEVEL",
)


@pytest.fixture(autouse=True)
def _restore_pynetdicom_flags() -> Iterator[None]:
    """An in-process receiver sets pynetdicom's process-wide flags; later tests get them back."""
    from pynetdicom import _config

    saved = {name: getattr(_config, name) for name in _PYNETDICOM_FLAGS}
    yield
    for name, value in saved.items():
        setattr(_config, name, value)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'pacs-ai.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    url, schema = new_pg_schema_url()
    yield url
    drop_pg_schema(schema)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test that takes it runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'pacs-ai.db'}"
        return
    url, schema = new_pg_schema_url()
    yield url
    drop_pg_schema(schema)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A real database at the head migration, on each backend."""
    eng = make_engine(db_url)
    migrate.upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    eng = make_engine(sqlite_url)
    migrate.upgrade(eng)
    yield eng
    eng.dispose()
