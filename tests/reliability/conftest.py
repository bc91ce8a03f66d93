"""Reliability fixtures: the interop suite's trained models and databases, daemons that die hard."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import Daemon
from tests.interop.conftest import database_url, demo_models

__all__ = ["database_url", "demo_models"]


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Daemons on `tmp_path`; each is SIGKILLed (whole process group) at the end of the test.

    A crash is what these tests are about, and a graceful stop of every daemon would only
    add its drain time to the suite.
    """
    started: list[Daemon] = []

    def make(config: dict[str, Any], env: dict[str, str] | None = None) -> Daemon:
        workdir = tmp_path / f"daemon{len(started)}"
        workdir.mkdir()
        daemon = Daemon(workdir, config, env)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.kill()
