"""Audit appender processes; a module of its own so `spawn` children import little."""

from __future__ import annotations

from multiprocessing.synchronize import Barrier
from typing import Any

from sqlalchemy import text

from daemon.db import audit
from daemon.db.engine import make_engine


def append_many(url: str, name: str, count: int, start: Barrier, results: Any) -> None:
    """Append `count` events, each in its own transaction, racing the other appenders."""
    engine = make_engine(url)
    with engine.connect() as conn:  # connect before the start line, so appends overlap
        conn.execute(text("SELECT 1"))
    done = 0
    try:
        start.wait(timeout=60)
        for i in range(count):
            with engine.begin() as conn:
                audit.record(conn, audit.ANALYSED, study_uid=f"1.2.{i}", appender=name)
            done += 1
    finally:
        results.put((name, done))
        engine.dispose()
