"""A running Receiver per test: free port, fresh spool, real database (fixtures from tests/)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from daemon.config import Settings
from daemon.metrics import Metrics
from daemon.receive import Receiver
from daemon.spool import Spool

AET = "PACSAI"

Start = Callable[..., Receiver]


def make_settings(
    port: int, spool_dir: Path, sources: list[dict[str, Any]] | None = None, **dicom: Any
) -> Settings:
    storage = {"spool_dir": str(spool_dir), "min_free_mb": dicom.pop("min_free_mb", 1)}
    base = {"ae_title": AET, "bind": "127.0.0.1", "port": port, "drain_seconds": 2.0}
    return Settings(dicom={**base, **dicom}, storage=storage, sources=sources or [])


@pytest.fixture
def stored() -> list[str]:
    """Study UIDs passed to on_stored, in order."""
    return []


@pytest.fixture
def start_receiver(
    port: int, spool_dir: Path, stored: list[str]
) -> Iterator[Callable[..., Receiver]]:
    """start_receiver(engine, spool=None, on_stored=None, sources=None, **dicom settings)
    -> a running Receiver."""
    running: list[Receiver] = []

    def start(
        engine: Engine,
        spool: Spool | None = None,
        on_stored: Callable[[str], None] | None = None,
        metrics: Metrics | None = None,
        sources: list[dict[str, Any]] | None = None,
        **dicom: Any,
    ) -> Receiver:
        receiver = Receiver(
            make_settings(port, spool_dir, sources, **dicom),
            engine,
            on_stored or stored.append,
            spool=spool,
            metrics=metrics,
        )
        receiver.start()
        running.append(receiver)
        return receiver

    yield start
    for receiver in running:
        receiver.stop(1.0)
