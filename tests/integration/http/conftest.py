"""`pacs-ai serve` with its HTTP server on: daemons from the interop fixtures, plus tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.http.auth import new_token
from tests.conftest import free_port
from tests.interop.conftest import daemon_config, database_url, demo_models, make_daemon

__all__ = ["database_url", "demo_models", "http_config", "make_daemon"]


def http_config(
    tmp_path: Path, models: Path, roles: tuple[str, ...] = ("store", "read"), **sections: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """A daemon configuration with `[http]` on a free port and one token per role."""
    tokens: dict[str, str] = {}
    entries = []
    for role in roles:
        token, sha = new_token()
        tokens[role] = token
        entries.append({"name": f"{role}-client", "sha256": sha, "role": role})
    http = {"bind": "127.0.0.1", "port": free_port(), "tokens": entries, **sections.pop("http", {})}
    return daemon_config(tmp_path, models, http=http, **sections), tokens


def no_models(tmp_path: Path) -> Path:
    """An empty model folder: with `[workers] count = 0` nothing loads it."""
    path = tmp_path / "no-models"
    path.mkdir(exist_ok=True)
    return path
