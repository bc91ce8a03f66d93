"""`pacs-ai serve` with its HTTP server on: daemons from the interop fixtures, plus tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.daemon_proc import Daemon, port_accepts, wait_for
from tests.interop.conftest import daemon_config, database_url, demo_models, make_daemon
from tests.unit.http.conftest import role_tokens

__all__ = ["database_url", "demo_models", "http_config", "make_daemon"]


def http_config(
    tmp_path: Path, models: Path, roles: tuple[str, ...] = ("store", "read"), **sections: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """A daemon configuration with `[http]` on a free port and one token per role."""
    tokens, entries = role_tokens(roles)
    http = {"bind": "127.0.0.1", "port": free_port(), "tokens": entries, **sections.pop("http", {})}
    return daemon_config(tmp_path, models, http=http, **sections), tokens


def no_models(tmp_path: Path) -> Path:
    """An empty model folder: with `[workers] count = 0` nothing loads it."""
    path = tmp_path / "no-models"
    path.mkdir(exist_ok=True)
    return path


def serving(daemon: Daemon) -> str:
    """Start `daemon`, wait until its HTTP port accepts too; the server's base URL."""
    daemon.start()
    port = int(daemon.config["http"]["port"])
    wait_for(lambda: port_accepts(port), 30, "the HTTP port")
    return f"http://127.0.0.1:{port}"
