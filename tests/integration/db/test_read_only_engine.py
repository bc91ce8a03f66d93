"""The console reads through a read-only engine: on SQLite its reads never hold the write
lock the receiver's commits need, and it cannot write."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import InternalError, OperationalError

from daemon.db import queue
from daemon.db.engine import make_engine
from daemon.db.schema import Job, Study, utcnow


def test_a_writer_commits_while_a_console_read_is_open(sqlite_engine: Engine) -> None:
    reader = make_engine(str(sqlite_engine.url), read_only=True)
    try:
        with reader.connect() as page:
            page.execute(select(Job.id)).all()  # a page's transaction, still open
            with sqlite_engine.connect() as writer:
                # Locked would fail at once, not after the 30 s busy timeout.
                writer.connection.dbapi_connection.execute("PRAGMA busy_timeout=0")
                with writer.begin():
                    queue.enqueue(writer, "analyse", "k1", max_attempts=3)
            assert page.execute(select(Job.id)).all() == []  # its snapshot
        with reader.connect() as later:
            assert len(later.execute(select(Job.id)).all()) == 1
    finally:
        reader.dispose()


def test_a_read_only_engine_cannot_write(engine: Engine) -> None:
    reader = make_engine(engine.url.render_as_string(hide_password=False), read_only=True)
    try:
        with pytest.raises((OperationalError, InternalError)), reader.begin() as conn:
            conn.execute(insert(Study).values(study_uid="1.2.3", version=1,
                                              first_received_at=utcnow(),
                                              last_received_at=utcnow()))  # fmt: skip
    finally:
        reader.dispose()
