"""The HTTP face of `serve`: an ingest of its own on the same spool and database, and uvicorn."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from daemon.config import HttpSettings, Settings
from daemon.db.engine import make_engine
from daemon.http.app import build_app
from daemon.http.auth import Authenticator
from daemon.http.context import HttpContext
from daemon.http.server import HttpServer
from daemon.logsetup import kv
from daemon.metrics import Metrics
from daemon.receive.ingest import Ingestor
from daemon.spool import Spool

log = logging.getLogger(__name__)

READER_POOL = 4


def warn_if_open(http: HttpSettings, logger: logging.Logger = log) -> bool:
    """Warn when anyone may store or read without credentials (or nobody at all); True if so."""
    if http.anonymous:
        logger.warning(
            "http.anonymous: any client may act without credentials",
            extra=kv(roles=",".join(http.anonymous), port=http.port),
        )
        return True
    if not http.tokens and not http.users and not (http.tls and http.tls.client_role):
        logger.warning(
            "http: no [[http.tokens]], [[http.users]] or [http.tls] client_role: "
            "only health answers",
            extra=kv(port=http.port),
        )
        return True
    return False


class HttpService:
    """DICOMweb, /metrics and health on `[http] bind:port`, storing through its own Ingestor.

    The Ingestor is the one C-STORE uses (same checks, quarantine, durability and group
    commit), on the same spool and database, with the same `on_stored` (the assembler).
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        spool: Spool,
        on_stored: Callable[[str], None] | None,
        *,
        health: Callable[[], list[str]],
        ready: Callable[[], bool],
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.ingestor = Ingestor(spool, engine, settings.storage.min_free_mb * 2**20, on_stored)
        self.reader = make_engine(
            engine.url.render_as_string(hide_password=False), pool_size=READER_POOL,
            read_only=True,
        )
        self._health = health
        self._ready = ready
        self._metrics = metrics
        self.server: HttpServer | None = None

    def start(self, registry: Any = None) -> None:
        """Listen and serve; HttpStartError names the setting when it cannot."""
        warn_if_open(self.settings.http)
        ctx = HttpContext(
            settings=self.settings,
            auth=Authenticator(self.settings.http),
            ingestor=self.ingestor,
            health=self._health,
            ready=self._ready,
            registry=registry,
            metrics=self._metrics,
            reader=self.reader,
        )
        self.server = HttpServer(self.settings.http, build_app(ctx))
        self.server.start()

    @property
    def port(self) -> int:
        return self.server.port if self.server else self.settings.http.port

    def alive(self) -> bool:
        return self.server is not None and self.server.alive()

    def stop(self, drain_seconds: float) -> None:
        """Finish running requests (up to `drain_seconds`), then stop storing."""
        if self.server is not None:
            self.server.stop(drain_seconds)
        self.ingestor.close()
        self.reader.dispose()
