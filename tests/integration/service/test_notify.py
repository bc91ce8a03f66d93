"""serve speaks systemd's notify protocol: READY when it serves, WATCHDOG only while healthy."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url, text

from daemon.db.engine import make_engine
from tests.conftest import PG_ADMIN_URL, require_postgres
from tests.daemon_proc import Daemon, port_accepts, wait_for
from tests.integration.service.helpers import NotifySocket, listening_children
from tests.interop.conftest import daemon_config

QUEUE_COUNTS = re.compile(r"jobs queued \d+, running \d+, dead \d+")
# WATCHDOG_USEC=1 s: the health loop runs every 0.5 s.
WATCHDOG_USEC = 1_000_000


def _no_models(tmp_path: Path) -> Path:
    """An empty model folder: with `[workers] count = 0` nothing loads it."""
    path = tmp_path / "no-models"
    path.mkdir(exist_ok=True)
    return path


def _start_notifying(
    make_daemon: Callable[..., Daemon], config: dict[str, Any]
) -> tuple[Daemon, NotifySocket]:
    """serve under a NOTIFY_SOCKET the test owns; each datagram notes whether the port accepted."""
    notify = NotifySocket()
    daemon = make_daemon(config, env=notify.env(WATCHDOG_USEC))
    notify.probe = lambda: {
        "port_accepts": port_accepts(daemon.port),
        "workers_ready_logged": "worker ready" in daemon.log(),
    }
    daemon.start()
    return daemon, notify


def _assert_pings_stop(notify: NotifySocket, fault: str, timeout: float = 60.0) -> None:
    """An `unhealthy` STATUS naming `fault` comes, and no WATCHDOG=1 after it for 3 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        unhealthy = [
            d for d in notify.having("STATUS") if d.fields["STATUS"].startswith("unhealthy")
        ]
        if unhealthy:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"no unhealthy STATUS in {timeout} s; last: {notify.received[-4:]}")
    first = unhealthy[0]
    assert fault in first.fields["STATUS"], first.fields
    time.sleep(3.0)
    assert notify.having("WATCHDOG", since=first.at) == []
    # The loop keeps saying why, every interval, instead of going quiet.
    later = [d for d in notify.having("STATUS", since=first.at) if d is not first]
    assert later and all(d.fields["STATUS"].startswith("unhealthy") for d in later)


def test_ready_comes_after_models_load_and_the_port_accepts_then_the_watchdog_is_petted(
    tmp_path: Path, demo_models: Path, make_daemon: Callable[..., Daemon]
) -> None:
    config = daemon_config(tmp_path, demo_models, dicom={"drain_seconds": 5})
    daemon, notify = _start_notifying(make_daemon, config)
    with notify:
        ready = notify.first("READY", timeout=180)
        assert ready.fields["READY"] == "1"
        assert notify.received[0] is ready, "nothing is announced before READY=1"
        assert ready.seen["port_accepts"], "READY=1 before the DICOM port accepted"
        assert ready.seen["workers_ready_logged"], "READY=1 before the workers loaded models"
        assert QUEUE_COUNTS.search(ready.fields["STATUS"]), ready.fields

        time.sleep(3.0)
        pings = notify.having("WATCHDOG", since=ready.at)
        assert len(pings) >= 3, f"{len(pings)} WATCHDOG=1 in 3 s at a 0.5 s interval"
        assert all(d.fields["WATCHDOG"] == "1" for d in pings)
        statuses = notify.having("STATUS", since=ready.at + 1e-9)
        assert statuses and all(QUEUE_COUNTS.search(d.fields["STATUS"]) for d in statuses)

        sent_term = time.monotonic()
        daemon.signal(signal.SIGTERM)
        stopping = notify.first("STOPPING", timeout=30, since=sent_term)
        assert stopping.fields["STOPPING"] == "1"
        assert daemon.proc is not None and daemon.proc.wait(60) == 0


def test_serve_on_a_database_behind_head_exits_without_ready(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    config = daemon_config(tmp_path, _no_models(tmp_path), workers={"count": 0})
    notify = NotifySocket()
    with notify:
        daemon = make_daemon(config, env=notify.env(WATCHDOG_USEC))
        with pytest.raises(RuntimeError, match="serve exited with 1"):
            daemon.start(timeout=60, upgrade=False)
        assert "pacs-ai db upgrade" in daemon.log()
        time.sleep(0.5)
        assert notify.having("READY") == []


@pytest.mark.postgres
def test_watchdog_stops_when_the_database_loses_the_service_tables(
    tmp_path: Path, pg_url: str, make_daemon: Callable[..., Daemon]
) -> None:
    config = daemon_config(
        tmp_path,
        _no_models(tmp_path),
        database_url=pg_url,
        workers={"count": 0},
        dicom={"drain_seconds": 2},
    )
    daemon, notify = _start_notifying(make_daemon, config)
    with notify:
        ready = notify.first("READY", timeout=120)
        notify.first("WATCHDOG", timeout=10, since=ready.at)

        schema = pg_url.rsplit("search_path%3D", 1)[1]
        admin = make_engine(PG_ADMIN_URL)
        try:
            with admin.begin() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '20s'"))
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        finally:
            admin.dispose()

        _assert_pings_stop(notify, "database")
        sent_term = time.monotonic()
        daemon.signal(signal.SIGTERM)
        notify.first("STOPPING", timeout=30, since=sent_term)


@pytest.fixture
def own_pg_database() -> Iterator[str]:
    """A PostgreSQL database of its own (not a schema), so the test may lock everyone out."""
    require_postgres()
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = make_engine(PG_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.postgres
def test_watchdog_stops_when_the_database_refuses_connections(
    tmp_path: Path, own_pg_database: str, make_daemon: Callable[..., Daemon]
) -> None:
    config = daemon_config(
        tmp_path,
        _no_models(tmp_path),
        database_url=own_pg_database,
        workers={"count": 0},
        dicom={"drain_seconds": 2},
    )
    daemon, notify = _start_notifying(make_daemon, config)
    with notify:
        ready = notify.first("READY", timeout=120)
        notify.first("WATCHDOG", timeout=10, since=ready.at)

        name = make_url(own_pg_database).database
        admin = make_engine(PG_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
        finally:
            admin.dispose()

        _assert_pings_stop(notify, "database")
        sent_term = time.monotonic()
        daemon.signal(signal.SIGTERM)
        notify.first("STOPPING", timeout=30, since=sent_term)


def test_watchdog_stops_when_a_receiver_process_dies(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    config = daemon_config(
        tmp_path,
        _no_models(tmp_path),
        workers={"count": 0},
        dicom={"processes": 2, "drain_seconds": 2},
    )
    daemon, notify = _start_notifying(make_daemon, config)
    with notify:
        ready = notify.first("READY", timeout=120)
        notify.first("WATCHDOG", timeout=10, since=ready.at)
        assert daemon.proc is not None
        receivers = listening_children(daemon.proc.pid, daemon.port)
        assert len(receivers) == 2, f"receiver processes listening on {daemon.port}: {receivers}"

        os.kill(receivers[0], signal.SIGKILL)

        _assert_pings_stop(notify, "receiver not running")
        sent_term = time.monotonic()
        daemon.signal(signal.SIGTERM)
        notify.first("STOPPING", timeout=30, since=sent_term)
        daemon.kill()  # whether it then exits is the next test's business


def test_serve_stops_on_sigterm_after_a_receiver_process_died(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    config = daemon_config(
        tmp_path,
        _no_models(tmp_path),
        workers={"count": 0},
        dicom={"processes": 2, "drain_seconds": 2},
    )
    daemon = make_daemon(config).start()
    assert daemon.proc is not None
    # Started, not just listening: a receiver killed before start-up is done is a failed
    # start (exit 1), which is another test's business.
    wait_for(lambda: " daemon.service serving " in daemon.log(), 60, "serve to finish starting")
    receivers = listening_children(daemon.proc.pid, daemon.port)
    assert len(receivers) == 2, f"receiver processes listening on {daemon.port}: {receivers}"
    os.kill(receivers[0], signal.SIGKILL)
    try:
        wait_for(lambda: "receiver not running" in daemon.log(), 30, "the health loop to notice")
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{daemon.log()[-3000:]}") from None

    daemon.signal(signal.SIGTERM)
    try:
        daemon.proc.wait(25)
    except subprocess.TimeoutExpired:
        daemon.kill()
        raise AssertionError(
            f"serve still running 25 s after SIGTERM:\n{daemon.log()[-2000:]}"
        ) from None
