"""Engines for a long-running service: SQLite in WAL with immediate writes, or PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

SQLITE_BUSY_TIMEOUT_MS = 30000


class DatabaseMissing(Exception):
    """The SQLite database file does not exist, and creating it is not this caller's job."""


class DatabaseNotAtHead(Exception):
    """The database's schema is not the one this code needs (`daemon.db.migrate`)."""


def is_sqlite(engine: Engine) -> bool:
    """Whether claims must use SQLite's UPDATE ... RETURNING path."""
    return engine.dialect.name == "sqlite"


def make_engine(
    url: str, *, pool_size: int = 5, create: bool = True, read_only: bool = False
) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout, foreign keys and BEGIN IMMEDIATE.

    With `create` false, an SQLite file (or its directory) that does not exist is never
    made: connecting raises `DatabaseMissing` instead (commands that only read, and serve).
    `read_only`: for pages that only read (the console). Its transactions never write, so on
    SQLite they begin deferred and read a WAL snapshot without taking the write lock the
    receiver's commits wait on; on PostgreSQL they are READ ONLY.
    """
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(
            parsed, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
        )
        return engine.execution_options(postgresql_readonly=True) if read_only else engine
    on_disk = parsed.database and parsed.database != ":memory:"
    if on_disk and create:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        parsed,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )
    _configure_sqlite(engine, read_only)
    if on_disk and not create:
        _refuse_missing(engine, Path(parsed.database))
    return engine


def _refuse_missing(engine: Engine, path: Path) -> None:
    """Raise `DatabaseMissing` instead of letting sqlite3 create `path` on connect."""

    @event.listens_for(engine, "do_connect")
    def _check(*_args: Any) -> None:
        if not path.is_file():
            raise DatabaseMissing(f"database {engine.url} does not exist")


def _configure_sqlite(engine: Engine, read_only: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so BEGIN IMMEDIATE is ours to emit.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=FULL")
        if read_only:
            cur.execute("PRAGMA query_only=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Every transaction takes the write lock up front: a deferred transaction that later
        # writes can fail with "database is locked" no matter how long the busy timeout is.
        # A read-only engine never writes, so its snapshot reads need no lock.
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
