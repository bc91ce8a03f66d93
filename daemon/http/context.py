"""What every route group is handed: built once by the service, reached from the request."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from daemon.config import Settings
from daemon.dicom import status
from daemon.http.auth import Authenticator
from daemon.logsetup import kv
from daemon.metrics import Metrics
from daemon.receive.ingest import Answer, Ingestor

log = logging.getLogger("daemon.http.app")


@dataclasses.dataclass(frozen=True)
class HttpContext:
    """The settings, the authenticator, the ingest, the service's health and its metrics.

    Attributes
    ----------
    health: what is wrong with the service now (empty: the watchdog would be petted).
    reader: the service's database through a read-only engine (the console's pages).
    ready: whether the service has started and is not draining.
    registry: the Prometheus registry `/metrics` exposes (every process's counters).
    """

    settings: Settings
    auth: Authenticator
    ingestor: Ingestor
    health: Callable[[], list[str]]
    ready: Callable[[], bool]
    registry: Any = None
    metrics: Metrics | None = None
    # Read-only connections for pages (the console): snapshot reads, no write lock.
    reader: Engine | None = None

    def count_instances(self, sender: str, answers: Sequence[Answer]) -> None:
        """Count STOW-RS instances as C-STORE's are counted (by sender and status)."""
        if self.metrics is None:
            return
        for answer in answers:
            self.metrics.instances_received.labels(sender, f"0x{answer.status:04X}").inc()
        stored = [a for a in answers if a.status == status.SUCCESS]
        if stored:
            self.metrics.bytes_received.inc(sum(a.size for a in stored))


STATE_KEY = "pacsai"


def context(conn: HTTPConnection) -> HttpContext:
    """The context the app was built with."""
    ctx: HttpContext = getattr(conn.app.state, STATE_KEY)
    return ctx


def peer(conn: HTTPConnection) -> str:
    """`host:port` of the client, for log lines."""
    client = conn.client
    return f"{client.host}:{client.port}" if client else "-"


def log_refusal(conn: HTTPConnection, exc: HTTPException, level: int = logging.WARNING) -> None:
    """The one line a refused request is logged as (every route group writes it this way)."""
    log.log(
        level,
        "http request refused",
        extra=kv(
            status=exc.status_code,
            reason=exc.detail,
            method=conn.scope.get("method", "-"),
            path=conn.url.path[:200],
            peer=peer(conn),
        ),
    )
