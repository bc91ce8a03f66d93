"""A `serve` that cannot listen, or is stopped while starting, ends at once and leaves nothing.

Each daemon runs in a session of its own, so "nothing left" is checked as "no live process
in that session": an orphaned worker keeps its parent's session and would be found.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.daemon_proc import Daemon, session_members, wait_for, worker_pids
from tests.interop.conftest import daemon_config

EXIT_TIMEOUT = 60.0


def _ended(daemon: Daemon) -> tuple[int, str]:
    """serve's exit code and log once it ends; then its session must be empty."""
    assert daemon.proc is not None
    try:
        code = daemon.proc.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        daemon.kill()
        pytest.fail(f"serve did not exit:\n{daemon.log()[-3000:]}")
    wait_for(lambda: not session_members(daemon.proc.pid), 30, "serve's processes to end")
    return code, daemon.log()


def _config(tmp_path: Path, models: Path, name: str, **sections: dict) -> dict:
    workdir = tmp_path / name
    workdir.mkdir()
    return daemon_config(
        workdir, models, database_url=f"sqlite:///{workdir / 'pacs-ai.db'}", **sections
    )


@pytest.mark.parametrize("processes", [1, 2])
def test_a_second_serve_on_the_same_dicom_port_exits_naming_the_setting(
    tmp_path: Path, make_daemon: Callable[..., Daemon], processes: int
) -> None:
    # Two receiver processes listen with SO_REUSEPORT, which a second daemon of the same
    # user could silently share: the check must refuse that too.
    models = tmp_path / "models"
    models.mkdir()
    first_config = _config(
        tmp_path, models, "first", workers={"count": 0}, dicom={"processes": processes}
    )
    make_daemon(first_config).start()
    port = first_config["dicom"]["port"]
    second = make_daemon(
        _config(
            tmp_path,
            models,
            "second",
            workers={"count": 1},
            dicom={"processes": processes, "port": port},
        )
    )
    second.spawn()
    code, log = _ended(second)
    assert code == 1, log
    assert f"dicom.port {port} is in use" in log
    assert "Traceback" not in log and "Errno" not in log


def test_serve_exits_naming_a_taken_metrics_port(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = make_daemon(
            _config(tmp_path, models, "d", workers={"count": 1}, metrics={"port": port})
        )
        daemon.spawn()
        code, log = _ended(daemon)
    assert code == 1, log
    assert f"metrics.port {port} is in use" in log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_workers_load_their_models_stops_everything(
    tmp_path: Path, make_daemon: Callable[..., Daemon], demo_models: Path, signum: int
) -> None:
    daemon = make_daemon(
        _config(tmp_path, demo_models, "d", workers={"count": 1}, metrics={"port": free_port()})
    )
    daemon.spawn()
    # The worker exists as soon as the pool spawned it; loading TensorFlow and the models
    # takes it seconds more, and serve waits for that before it listens.
    wait_for(lambda: worker_pids(daemon), 60, "the worker process")
    daemon.signal(signum)
    code, log = _ended(daemon)
    assert code == 0, log
    assert "stopped while starting" in log
    assert "daemon.service serving" not in log


def test_workers_stop_when_serve_is_killed(
    tmp_path: Path, make_daemon: Callable[..., Daemon], demo_models: Path
) -> None:
    daemon = make_daemon(
        _config(tmp_path, demo_models, "d", workers={"count": 1}, dicom={"processes": 2})
    )
    daemon.start()
    assert daemon.proc is not None
    assert worker_pids(daemon)
    daemon.proc.send_signal(signal.SIGKILL)  # serve alone, not its session
    daemon.proc.wait(10)
    wait_for(lambda: not session_members(daemon.proc.pid), 60, "the orphaned workers to stop")
