"""How C-STORE statuses, rejections and local problems become outcomes."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import Destination
from daemon.dicom.status import describe_rejection, status_meaning
from daemon.dispatch.scu import (
    BAD_FILE,
    CONNECT_FAILED,
    SENT,
    SENT_WITH_WARNING,
    STORE_FAILED,
    classify_store_status,
    echo,
    send_file,
    store_outcome,
)
from tests.peers import free_port


def closed_port_destination() -> Destination:
    return Destination(name="gone", ae_title="NOBODY", host="127.0.0.1", port=free_port())


def test_success_is_sent() -> None:
    assert classify_store_status(0x0000) == (SENT, False)


@pytest.mark.parametrize("status", [0xB000, 0xB006, 0xB007])
def test_warning_statuses_count_as_sent(status: int) -> None:
    outcome = store_outcome(status, "1.2.3", "1.2.3.4", fallback=False)
    assert outcome.ok
    assert outcome.kind == SENT_WITH_WARNING
    assert outcome.detail.startswith(f"0x{status:04X} ")


@pytest.mark.parametrize(
    ("status", "meaning"),
    [
        (0xA700, "out of resources"),
        (0xA7FF, "out of resources"),
        (0x0110, "processing failure"),
        (0x0122, "SOP class not supported"),
        (0x0124, "not authorized"),
        (0x0213, "resource limitation"),
        (0xFFFE, "unknown status"),
    ],
)
def test_peer_side_failures_are_retried(status: int, meaning: str) -> None:
    outcome = store_outcome(status, "1.2.3", "1.2.3.4", fallback=False)
    assert not outcome.ok
    assert outcome.kind == STORE_FAILED
    assert outcome.retryable
    assert outcome.detail == f"0x{status:04X} {meaning}"


@pytest.mark.parametrize("status", [0xA900, 0xA9FF, 0xC000, 0xCFFF, 0x0117, 0x0212])
def test_content_failures_are_not_retried(status: int) -> None:
    kind, retryable = classify_store_status(status)
    assert kind == STORE_FAILED
    assert not retryable


def test_status_meaning_names_ranges() -> None:
    assert status_meaning(0xA701) == "out of resources"
    assert status_meaning(0xA901) == "data set does not match SOP class"
    assert status_meaning(0xC123) == "cannot understand"
    assert status_meaning(0xB007) == "data set does not match SOP class"


def test_rejection_names_the_unknown_calling_ae() -> None:
    text = describe_rejection(1, 1, 3)
    assert text == "association rejected (permanent) by the service user: " + (
        "calling AE title not recognized"
    )


def test_rejection_with_unusual_codes_still_describes() -> None:
    assert "reason 9" in describe_rejection(2, 1, 9)
    assert "(transient)" in describe_rejection(2, 3, 1)


def test_missing_file_is_a_bad_file_not_retried(tmp_path: Path) -> None:
    outcome = send_file(tmp_path / "missing.dcm", None, closed_port_destination(), "PACSAI")
    assert not outcome.ok
    assert outcome.kind == BAD_FILE
    assert not outcome.retryable


def test_not_dicom_is_a_bad_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    outcome = send_file(junk, None, closed_port_destination(), "PACSAI")
    assert outcome.kind == BAD_FILE


def test_closed_port_is_a_retryable_connection_failure(sr_pair: tuple[Path, Path]) -> None:
    dest = closed_port_destination()
    outcome = send_file(sr_pair[0], sr_pair[1], dest, "PACSAI")
    assert not outcome.ok
    assert outcome.kind == CONNECT_FAILED
    assert outcome.retryable
    assert f"could not connect to NOBODY@127.0.0.1:{dest.port}" == outcome.detail


def test_echo_to_closed_port_fails() -> None:
    outcome = echo(closed_port_destination(), "PACSAI")
    assert not outcome.ok
    assert outcome.kind == CONNECT_FAILED
    assert outcome.round_trip_ms is None


def test_outcomes_read_as_one_line() -> None:
    sent = store_outcome(0x0000, "1.2.840.10008.5.1.4.1.1.88.22", "1.2.3", fallback=True)
    assert str(sent) == "sent (Enhanced SR Storage, fallback): 0x0000 success"
    assert str(echo(closed_port_destination(), "PACSAI")).startswith(
        "connect-failed: could not connect to NOBODY@127.0.0.1:"
    )
