"""Storage Commitment requests and reports, written and read back as a peer would see them."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

from daemon.dicom.commitment import (
    EVENT_ALL_SUCCESS,
    EVENT_FAILURES_PRESENT,
    MalformedCommitment,
    commitment_report,
    commitment_request,
    read_commitment_report,
    read_commitment_request,
)
from daemon.dicom.status import (
    INVALID_ARGUMENT_VALUE,
    NO_SUCH_EVENT_TYPE,
    NO_SUCH_OBJECT_INSTANCE,
)

SR = str(Comprehensive3DSRStorage)


def test_a_request_reads_back_as_written() -> None:
    transaction, refs = generate_uid(), ((SR, generate_uid()), (SR, generate_uid()))
    assert read_commitment_request(commitment_request(transaction, refs)) == (transaction, refs)


@pytest.mark.parametrize(
    ("info", "why"),
    [
        (None, "missing"),
        (commitment_request("", [(SR, "1.2.3")]), "no Transaction UID"),
        (commitment_request("1.2.3", []), "references nothing"),
    ],
)
def test_a_request_that_cannot_be_acted_on_is_malformed(info: Dataset | None, why: str) -> None:
    with pytest.raises(MalformedCommitment, match=why) as raised:
        read_commitment_request(info)
    assert raised.value.status == INVALID_ARGUMENT_VALUE


def test_a_report_of_kept_and_lost_instances_reads_back_with_its_reasons() -> None:
    transaction, kept, lost = generate_uid(), generate_uid(), generate_uid()
    event_type, info = commitment_report(
        transaction, [(SR, kept)], [(SR, lost, NO_SUCH_OBJECT_INSTANCE)]
    )
    assert event_type == EVENT_FAILURES_PRESENT
    report = read_commitment_report(event_type, info)
    assert (report.transaction_uid, report.committed) == (transaction, (kept,))
    assert report.failed == ((lost, NO_SUCH_OBJECT_INSTANCE),)
    assert not report.success
    assert report.describe() == f"storage commitment failed: {lost} 0x0112 no such object instance"


def test_a_report_of_everything_kept_is_a_success() -> None:
    event_type, info = commitment_report(generate_uid(), [(SR, generate_uid())])
    assert event_type == EVENT_ALL_SUCCESS
    report = read_commitment_report(event_type, info)
    assert report.success and report.describe() == "storage commitment: 1 committed"


def test_a_report_of_another_event_type_is_refused_as_such() -> None:
    _, info = commitment_report(generate_uid(), [])
    with pytest.raises(MalformedCommitment) as raised:
        read_commitment_report(3, info)
    assert raised.value.status == NO_SUCH_EVENT_TYPE
