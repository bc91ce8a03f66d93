"""Which job a worker takes next: the oldest due, but a study's analysis, report or delivery
before another study's early passes, which only fill a cache; on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import Engine

from daemon.config import Settings
from daemon.context import JobHandler, WorkerContext
from daemon.db import queue
from daemon.db.keys import ANALYSE, DISPATCH, EMBED
from daemon.db.queue import ClaimedJob
from daemon.db.schema import utcnow
from daemon.spool import Spool
from daemon.worker import run_one


def test_early_passes_wait_until_no_analysis_report_or_delivery_is_due(
    engine: Engine, tmp_path: Path
) -> None:
    earlier = utcnow() - dt.timedelta(seconds=10)
    with engine.begin() as conn:
        for key, kind in (("embed:a", EMBED), ("embed:b", EMBED), ("analyse:c", ANALYSE),
                          ("dispatch:d", DISPATCH)):
            queue.enqueue(conn, kind, key, max_attempts=3, run_after=earlier)
            earlier += dt.timedelta(seconds=1)  # the early passes are the oldest
    ran: list[str] = []

    def record(_ctx: WorkerContext, job: ClaimedJob) -> None:
        ran.append(job.key)

    ctx = WorkerContext(settings=Settings(storage={"spool_dir": str(tmp_path)}), engine=engine,
                        spool=Spool(tmp_path), owner="test:1:w0")
    handlers = {kind: JobHandler(record) for kind in (EMBED, ANALYSE, DISPATCH)}
    while run_one(ctx, handlers):
        pass
    assert ran == ["analyse:c", "dispatch:d", "embed:a", "embed:b"]
