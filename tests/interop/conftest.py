"""Interop fixtures: trained demo models and a daemon configured against real peers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import drop_pg_schema, free_port, new_pg_schema_url
from tests.daemon_proc import Daemon


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick demo CNN and LSTM, trained once per test session (seconds)."""
    from models.demo import DemoConfig, make_demo

    out = tmp_path_factory.mktemp("demo")
    result = make_demo(out, DemoConfig.quick(), progress=False)
    return result.models_dir


def daemon_config(
    workdir: Path,
    models_dir: Path,
    *,
    database_url: str | None = None,
    destinations: list[dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A fast-cycling configuration: 1 s quiet window, 1 s first retry, one worker."""
    config: dict[str, Any] = {
        "dicom": {"ae_title": "PACSAI", "bind": "127.0.0.1", "port": free_port()},
        "storage": {"spool_dir": workdir / "spool", "min_free_mb": 1},
        "assembly": {"quiet_seconds": 1, "sweep_seconds": 2},
        "workers": {"count": 1, "lease_seconds": 30},
        "models": {"dir": models_dir},
        "retry": {"base_seconds": 1, "factor": 2, "cap_seconds": 4, "max_attempts": 20},
        "metrics": {"port": 0},
    }
    if database_url:
        config["storage"]["database_url"] = database_url
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    if destinations:
        config["destinations"] = destinations
    return config


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each end-to-end test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'pacs-ai.db'}"
        return
    url, schema = new_pg_schema_url()
    yield url
    drop_pg_schema(schema)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Build daemons whose processes are stopped at the end of the test."""
    started: list[Daemon] = []

    def make(config: dict[str, Any], env: dict[str, str] | None = None) -> Daemon:
        workdir = tmp_path / f"daemon{len(started)}"
        workdir.mkdir()
        daemon = Daemon(workdir, config, env)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.__exit__(None, None, None)
