"""What every job handler is handed: built once per worker process, passed down explicitly."""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import Engine

from daemon.config import Settings
from daemon.db import queue
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
