"""Storage Commitment Push Model (PS3.4 J): its requests and reports as values.

The N-ACTION asks a peer to commit instances under a Transaction UID; the peer answers
with an N-EVENT-REPORT naming what it keeps and what it does not. Both directions read and
write them here, so the database layer (daemon.db.deliveries) works on plain values and
never touches pydicom.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TypeVar

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

from daemon.dicom.network import UNCOMPRESSED
from daemon.dicom.status import (
    INVALID_ARGUMENT_VALUE,
    NO_SUCH_EVENT_TYPE,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
    Refusal,
    status_meaning,
)

# The well-known SOP Instance every request and report is addressed to, and the action.
STORAGE_COMMITMENT_INSTANCE = str(StorageCommitmentPushModelInstance)
REQUEST_STORAGE_COMMITMENT = 1  # N-ACTION Action Type ID (PS3.4 J.3.2)

# N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3).
EVENT_ALL_SUCCESS = 1
EVENT_FAILURES_PRESENT = 2
COMMITMENT_EVENT_TYPES = (EVENT_ALL_SUCCESS, EVENT_FAILURES_PRESENT)

# The most instances one request (or one MPPS step) may name: a 3000-slice CT and a few
# series besides fit; more is answered "resource limitation", not held in memory and rows.
MAX_REFERENCES = 20000

T = TypeVar("T")
Reference = tuple[str, str]
"""(Referenced SOP Class UID, Referenced SOP Instance UID)."""


class MalformedCommitment(Refusal):
    """A request or report that is not a Storage Commitment message we can read.

    `status` is the DIMSE status to answer it with.
    """


@dataclasses.dataclass(frozen=True)
class CommitmentReport:
    """What a Storage Commitment N-EVENT-REPORT said about one transaction.

    Attributes
    ----------
    transaction_uid: the Transaction UID of the N-ACTION it answers.
    event_type: EVENT_ALL_SUCCESS or EVENT_FAILURES_PRESENT.
    committed: SOP Instance UIDs the peer keeps.
    failed: (SOP Instance UID, Failure Reason) of those it does not.
    """

    transaction_uid: str
    event_type: int
    committed: tuple[str, ...] = ()
    failed: tuple[tuple[str, int], ...] = ()

    @property
    def success(self) -> bool:
        """All referenced instances are committed (event type 1, nothing failed)."""
        return self.event_type == EVENT_ALL_SUCCESS and not self.failed

    def describe(self) -> str:
        """One line for the Dispatch row and logs."""
        if self.success:
            return f"storage commitment: {len(self.committed)} committed"
        reasons = ", ".join(
            f"{uid} 0x{reason:04X} {_failure_meaning(reason)}" for uid, reason in self.failed
        )
        return f"storage commitment failed: {reasons or 'no reason given'}"


def _failure_meaning(reason: int) -> str:
    meaning = status_meaning(reason)
    return "failure" if meaning == "unknown status" else meaning


def reference_items(items: Sequence[Reference]) -> list[Dataset]:
    """Referenced SOP Sequence items naming each (SOP Class UID, SOP Instance UID)."""
    out = []
    for sop_class_uid, sop_instance_uid in items:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class_uid
        item.ReferencedSOPInstanceUID = sop_instance_uid
        out.append(item)
    return out


def commitment_request(transaction_uid: str, references: Sequence[Reference]) -> Dataset:
    """The N-ACTION Action Information asking to commit (SOP Class UID, SOP Instance UID) pairs."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = reference_items(references)
    return ds


def _read(what: str, info: Dataset | None, parse: Callable[[Dataset], T]) -> tuple[str, T]:
    """(Transaction UID, `parse(info)`), or MalformedCommitment naming `what` and why."""
    if info is None:
        raise MalformedCommitment(f"{what} is missing", INVALID_ARGUMENT_VALUE)
    try:
        transaction_uid = str(info.get("TransactionUID") or "")
        body = parse(info)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # pydicom decodes lazily: a broken element fails only when it is read here.
        raise MalformedCommitment(f"{what} cannot be read: {exc}", INVALID_ARGUMENT_VALUE) from exc
    if not transaction_uid:
        raise MalformedCommitment(f"{what} has no Transaction UID", INVALID_ARGUMENT_VALUE)
    return transaction_uid, body


def _referenced(info: Dataset) -> tuple[Reference, ...]:
    return tuple(
        (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
        for item in info.get("ReferencedSOPSequence", []) or []
    )


def is_uid(value: str) -> bool:
    """Whether `value` can name an instance: 1-64 printable characters, no backslash.

    Malformed but harmless UIDs (letters, leading zeros) pass, as the receiver stores them.
    """
    return 0 < len(value) <= 64 and value.isprintable() and "\\" not in value


def read_commitment_request(info: Dataset | None) -> tuple[str, tuple[Reference, ...]]:
    """(Transaction UID, references) of an N-ACTION's Action Information, or MalformedCommitment.

    More than MAX_REFERENCES instances are refused with "resource limitation".
    """
    if info is not None and len(info.get("ReferencedSOPSequence", None) or ()) > MAX_REFERENCES:
        raise MalformedCommitment(
            f"action information names more than {MAX_REFERENCES} instances", RESOURCE_LIMITATION
        )
    transaction_uid, references = _read("action information", info, _referenced)
    if not references:
        raise MalformedCommitment("action information references nothing", INVALID_ARGUMENT_VALUE)
    bad = [uid for pair in references for uid in pair if not is_uid(uid)]
    if bad or not is_uid(transaction_uid):
        what = repr(bad[0][:70]) if bad else "the Transaction UID"
        raise MalformedCommitment(
            f"action information holds a malformed UID: {what}", INVALID_ARGUMENT_VALUE
        )
    return transaction_uid, references


def commitment_report(
    transaction_uid: str,
    committed: Sequence[Reference],
    failed: Sequence[tuple[str, str, int]] = (),
) -> tuple[int, Dataset]:
    """(Event Type ID, Event Information): what is kept, and (class, UID, reason) of what is not."""
    info = Dataset()
    info.TransactionUID = transaction_uid
    info.ReferencedSOPSequence = reference_items(committed)
    if failed:
        items = reference_items([(cls, uid) for cls, uid, _ in failed])
        for item, (_, _, reason) in zip(items, failed, strict=True):
            item.FailureReason = reason
        info.FailedSOPSequence = items
    return (EVENT_FAILURES_PRESENT if failed else EVENT_ALL_SUCCESS), info


def _outcomes(info: Dataset) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    """(committed SOP Instance UIDs, (failed UID, Failure Reason)) of Event Information."""
    committed = tuple(
        str(item.ReferencedSOPInstanceUID)
        for item in info.get("ReferencedSOPSequence", []) or []
        if "ReferencedSOPInstanceUID" in item
    )
    failed = tuple(
        (
            str(item.get("ReferencedSOPInstanceUID", "")),
            int(item.get("FailureReason", PROCESSING_FAILURE)),
        )
        for item in info.get("FailedSOPSequence", []) or []
    )
    return committed, failed


def read_commitment_report(event_type: int | None, info: Dataset | None) -> CommitmentReport:
    """The report in an N-EVENT-REPORT's Event Type ID and Event Information.

    Raises MalformedCommitment, carrying the status to answer with, for anything else.
    """
    if event_type not in COMMITMENT_EVENT_TYPES:
        raise MalformedCommitment(
            f"event type {event_type} is not a storage commitment result", NO_SUCH_EVENT_TYPE
        )
    transaction_uid, (committed, failed) = _read("event information", info, _outcomes)
    return CommitmentReport(transaction_uid, int(event_type), committed, failed)


def add_commitment_context(ae: AE, transfer_syntaxes: Sequence[str] = UNCOMPRESSED) -> None:
    """Accept Storage Commitment Push Model in either role the peer proposes.

    A PACS that sends a report on an association of its own is the requestor but the SCP
    of the service, so it proposes the SCP role by role selection; without `scp_role=True`
    pynetdicom would refuse that role and the report could not be sent.
    """
    ae.add_supported_context(
        StorageCommitmentPushModel, list(transfer_syntaxes), scu_role=True, scp_role=True
    )
