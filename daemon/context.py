"""What every job handler is handed: built once per worker process, passed down explicitly."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from daemon.config import Settings
from daemon.db import queue
from daemon.db.schema import JobState
from daemon.metrics import Metrics
from daemon.spool import Spool


@dataclasses.dataclass
class WorkerContext:
    """The database, spool, models and counters of one worker process."""

    settings: Settings
    engine: Engine
    spool: Spool
    owner: str
    registry: Any = None
    policy: queue.RetryPolicy = dataclasses.field(default_factory=queue.RetryPolicy)
    metrics: Metrics | None = None


Run = Callable[[WorkerContext, queue.ClaimedJob], None]


def _nothing(*_args: Any) -> None:
    """No bookkeeping around this kind of job."""


@dataclasses.dataclass(frozen=True)
class JobHandler:
    """How a worker runs one kind of job, and what it records around each run.

    `started` runs before the job, `finished` (with the seconds it took) after it succeeded,
    `failed` (with the state the failure left the job in, None when the lease was lost
    meanwhile, and the error) after the failure was recorded, so a dead job's own rows can
    follow it.
    """

    run: Run
    started: Callable[[WorkerContext, queue.ClaimedJob], None] = _nothing
    finished: Callable[[WorkerContext, queue.ClaimedJob, float], None] = _nothing
    failed: Callable[[WorkerContext, queue.ClaimedJob, JobState | None, str], None] = _nothing
