"""Fixtures of the governance tests: a prepared spool and a config file on the test database."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.spool import Spool


@pytest.fixture
def spool(spool_dir: Path) -> Spool:
    """A fresh, prepared spool."""
    s = Spool(spool_dir)
    s.prepare()
    return s


@pytest.fixture
def config_file(tmp_path: Path, spool_dir: Path) -> Callable[..., Path]:
    """Writes a TOML file naming the test database (and any extra TOML); returns its path."""

    def write(url: str, extra: str = "") -> Path:
        path = tmp_path / "pacs-ai.toml"
        path.write_text(f'[storage]\nspool_dir = "{spool_dir}"\ndatabase_url = "{url}"\n{extra}\n')
        return path

    return write
