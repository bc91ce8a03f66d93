"""What every route group is handed: built once by the service, reached from the request."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from starlette.requests import HTTPConnection

from daemon.config import Settings
from daemon.dicom import status
from daemon.http.auth import Authenticator
from daemon.metrics import Metrics
from daemon.receive.ingest import Answer, Ingestor


@dataclasses.dataclass(frozen=True)
class HttpContext:
    """The settings, the authenticator, the ingest, the service's health and its metrics.

    Attributes
    ----------
    health: what is wrong with the service now (empty: the watchdog would be petted).
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
