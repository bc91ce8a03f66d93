"""Association control: who may associate, how many at once, and graceful shutdown."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from sqlalchemy import Engine

from daemon.dicom import status
from daemon.metrics import Metrics
from tests.integration.receive.helpers import (
    ECHOSCU,
    dcmtk,
    reject_reason,
    require_dcmtk,
    try_associate,
)


def test_dcmtk_echoscu_is_answered(sqlite_engine: Engine, start_receiver, port: int) -> None:
    require_dcmtk()
    start_receiver(sqlite_engine)
    result = dcmtk(ECHOSCU, "-aec", "PACSAI", "127.0.0.1", str(port))
    assert result.returncode == 0, result.stderr


def test_pynetdicom_echo_is_answered(sqlite_engine: Engine, start_receiver, port: int) -> None:
    start_receiver(sqlite_engine)
    assoc = try_associate(port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == status.SUCCESS
    assoc.release()


def test_wrong_called_ae_is_rejected(
    sqlite_engine: Engine, start_receiver, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    start_receiver(sqlite_engine)
    with caplog.at_level(logging.WARNING, logger="daemon.receive"):
        assoc = try_associate(port, called="NOTPACSAI")
        time.sleep(0.2)
    assert assoc.is_rejected
    assert reject_reason(assoc) == status.REJECT_CALLED_AE
    lines = [r for r in caplog.records if r.getMessage() == "association rejected"]
    assert len(lines) == 1
    fields = lines[0].kv  # type: ignore[attr-defined]
    assert fields["called_ae"] == "NOTPACSAI"
    assert fields["calling_ae"] == "TESTSCU"
    assert fields["peer"].startswith("127.0.0.1:")


def test_unknown_calling_ae_is_rejected(sqlite_engine: Engine, start_receiver, port: int) -> None:
    start_receiver(sqlite_engine, allowed_callers=["CT01", "MR01"])
    assoc = try_associate(port, calling="INTRUDER")
    assert assoc.is_rejected
    assert reject_reason(assoc) == status.REJECT_CALLING_AE


def test_allowed_calling_ae_is_accepted(sqlite_engine: Engine, start_receiver, port: int) -> None:
    start_receiver(sqlite_engine, allowed_callers=["CT01", "MR01"])
    assoc = try_associate(port, calling="MR01")
    assert assoc.is_established
    assoc.release()


def test_associations_beyond_the_limit_are_rejected_transiently(
    sqlite_engine: Engine, start_receiver, port: int
) -> None:
    start_receiver(sqlite_engine, max_associations=2)
    first, second = try_associate(port), try_associate(port)
    assert first.is_established and second.is_established
    third = try_associate(port)
    assert third.is_rejected
    assert reject_reason(third) == status.REJECT_LOCAL_LIMIT
    first.release()
    fourth = try_associate(port)
    deadline = time.monotonic() + 5
    while fourth.is_rejected and time.monotonic() < deadline:  # the released one winds down
        time.sleep(0.1)
        fourth = try_associate(port)
    assert fourth.is_established
    for assoc in (second, fourth):
        assoc.release()


def test_stop_accepting_rejects_new_associations_but_finishes_running_ones(
    sqlite_engine: Engine, start_receiver, port: int
) -> None:
    receiver = start_receiver(sqlite_engine)
    running = try_associate(port)
    assert running.is_established
    receiver.stop_accepting()
    late = try_associate(port)
    assert late.is_rejected
    assert reject_reason(late) == status.REJECT_LOCAL_LIMIT
    assert running.send_c_echo().Status == status.SUCCESS
    running.release()
    assert receiver.alive()


def test_stop_aborts_associations_still_open_after_the_drain(
    sqlite_engine: Engine, start_receiver, port: int
) -> None:
    receiver = start_receiver(sqlite_engine)
    idle = try_associate(port)
    assert idle.is_established
    started = time.monotonic()
    receiver.stop(0.5)
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while not idle.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert idle.is_aborted
    assert not receiver.alive()


def test_several_processes_share_the_port(sqlite_engine: Engine, start_receiver, port: int) -> None:
    receiver = start_receiver(sqlite_engine, processes=2)
    assert receiver.alive()
    for _ in range(4):
        assoc = try_associate(port)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == status.SUCCESS
        assoc.release()
    receiver.stop(1.0)
    assert not receiver.alive()


def _active(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("pacsai_associations_active") or 0.0


def _wait_active(metrics: Metrics, expected: float) -> float:
    """The gauge once it reads `expected`, or what it reads after a few seconds."""
    deadline = time.monotonic() + 5.0
    while _active(metrics) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return _active(metrics)


def test_active_associations_gauge_returns_to_zero_however_associations_end(
    sqlite_engine: Engine, start_receiver, port: int
) -> None:
    metrics = Metrics()
    start_receiver(sqlite_engine, metrics=metrics)
    aborted, released, dropped = try_associate(port), try_associate(port), try_associate(port)
    assert aborted.is_established and released.is_established and dropped.is_established
    assert _wait_active(metrics, 3) == 3
    aborted.abort()
    released.release()
    dropped.dul.socket.socket.shutdown(socket.SHUT_RDWR)  # the peer vanishes mid-association
    rejected = try_associate(port, called="NOT-US")
    assert rejected.is_rejected
    assert _wait_active(metrics, 0) == 0
