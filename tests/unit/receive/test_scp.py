"""The receiver's process-wide setup and its start-time warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pynetdicom import _config

from daemon.config import Settings
from daemon.receive import configure_pynetdicom, warn_if_open
from daemon.receive.scp import TRANSFER_SYNTAXES


def test_configure_pynetdicom_accepts_any_storage_class_and_logs_no_identifiers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (
        "UNRESTRICTED_STORAGE_SERVICE",
        "LOG_REQUEST_IDENTIFIERS",
        "LOG_RESPONSE_IDENTIFIERS",
        "STORE_RECV_CHUNKED_DATASET",
        "LOG_HANDLER_LEVEL",
    ):
        monkeypatch.setattr(_config, name, getattr(_config, name))
    configure_pynetdicom()
    assert _config.UNRESTRICTED_STORAGE_SERVICE is True
    assert _config.LOG_REQUEST_IDENTIFIERS is False
    assert _config.LOG_RESPONSE_IDENTIFIERS is False


def test_open_receiver_is_warned_about(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    settings = Settings(storage={"spool_dir": str(tmp_path)})
    with caplog.at_level(logging.WARNING):
        assert warn_if_open(settings) is True
    assert "allowed_callers" in caplog.text


def test_restricted_receiver_is_not_warned_about(tmp_path: Path) -> None:
    settings = Settings(dicom={"allowed_callers": ["CT01"]}, storage={"spool_dir": str(tmp_path)})
    assert warn_if_open(settings) is False


def test_compressed_and_uncompressed_syntaxes_are_offered() -> None:
    for uid in (
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
    ):
        assert uid in TRANSFER_SYNTAXES
