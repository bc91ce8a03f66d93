"""Delivery verification on the outbox: confirm a sent report, or send it once more.

Both the `verify` job (daemon.dispatch.verify) and the receiver's Storage Commitment
N-EVENT-REPORT handler (daemon.receive.commitment) change Dispatch rows the same way,
so the rules live here, below both: every function works in the caller's transaction.

States (daemon.db.schema.DISPATCH_STATES): a row is `sent` after a C-STORE the peer
took; `confirmed` once the destination proved it keeps the instance (a storage
commitment success or a C-FIND match); back to `pending`, with one more `dispatch`
job queued, when the destination said it failed to keep it or never confirmed it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pydicom.dataset import Dataset
from sqlalchemy import Connection, select, update

from daemon.db import queue
from daemon.db.keys import DISPATCH, resend_key
from daemon.db.schema import Dispatch, utcnow

# Dispatch row states used here (daemon.db.schema.DISPATCH_STATES).
PENDING = "pending"
SENT = "sent"
CONFIRMED = "confirmed"

# Destination.verify values (daemon.config.Destination).
VERIFY_NONE = "none"
VERIFY_FIND = "find"
VERIFY_COMMITMENT = "commitment"
VERIFY_QIDO = "qido"

# N-EVENT-REPORT Event Type IDs of the Storage Commitment Push Model (PS3.4 J.3.3).
EVENT_ALL_SUCCESS = 1
EVENT_FAILURES_PRESENT = 2
COMMITMENT_EVENT_TYPES = (EVENT_ALL_SUCCESS, EVENT_FAILURES_PRESENT)

# Failure Reason (0008,1197) values, PS3.4 J.3.3.1.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}


# N-EVENT-REPORT response statuses for a report we cannot read (PS3.7 10.1.1.1.8).
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115


class MalformedReport(ValueError):
    """An N-EVENT-REPORT that is not a Storage Commitment result we can read.

    `status` is the DIMSE status to answer it with.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class CommitmentReport:
    """What a Storage Commitment N-EVENT-REPORT said about one transaction.

    Attributes
    ----------
    transaction_uid: the Transaction UID of our N-ACTION.
    event_type: EVENT_ALL_SUCCESS or EVENT_FAILURES_PRESENT.
    committed: SOP Instance UIDs the destination keeps.
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
            f"{uid} 0x{reason:04X} {FAILURE_REASONS.get(reason, 'failure')}"
            for uid, reason in self.failed
        )
        return f"storage commitment failed: {reasons or 'no reason given'}"


def read_commitment_report(event_type: int | None, info: Dataset | None) -> CommitmentReport:
    """The report in an N-EVENT-REPORT's Event Type ID and Event Information, or MalformedReport."""
    if event_type not in COMMITMENT_EVENT_TYPES:
        raise MalformedReport(
            f"event type {event_type} is not a storage commitment result", NO_SUCH_EVENT_TYPE
        )
    try:
        transaction_uid = str(info.get("TransactionUID") or "") if info is not None else ""
        committed = tuple(
            str(item.ReferencedSOPInstanceUID)
            for item in info.get("ReferencedSOPSequence", []) or []
            if "ReferencedSOPInstanceUID" in item
        )
        failed = tuple(
            (str(item.get("ReferencedSOPInstanceUID", "")), int(item.get("FailureReason", 0x0110)))
            for item in info.get("FailedSOPSequence", []) or []
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # pydicom decodes lazily: a broken element fails only when it is read here.
        raise MalformedReport(
            f"event information cannot be read: {exc}", INVALID_ARGUMENT_VALUE
        ) from exc
    if not transaction_uid:
        raise MalformedReport("event information has no Transaction UID", INVALID_ARGUMENT_VALUE)
    return CommitmentReport(transaction_uid, int(event_type), committed, failed)


def commitment_request(transaction_uid: str, references: Sequence[tuple[str, str]]) -> Dataset:
    """The N-ACTION Action Information asking to commit (SOP Class UID, SOP Instance UID) pairs."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class_uid, sop_instance_uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class_uid
        item.ReferencedSOPInstanceUID = sop_instance_uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def mark_confirmed(conn: Connection, dispatch_id: int, send_attempt: int, detail: str) -> bool:
    """`sent` -> `confirmed` for the send numbered `send_attempt`; False if the row moved on."""
    now = utcnow()
    res = conn.execute(
        update(Dispatch)
        .where(
            Dispatch.id == dispatch_id,
            Dispatch.state == SENT,
            Dispatch.attempts == send_attempt,
        )
        .values(state=CONFIRMED, confirmed_at=now, last_status=detail, updated_at=now)
    )
    return res.rowcount == 1


def resend(
    conn: Connection,
    dispatch_id: int,
    send_attempt: int,
    reason: str,
    *,
    max_attempts: int,
) -> bool:
    """`sent` -> `pending` and one more `dispatch` job; False if the row moved on meanwhile.

    The report keeps its SOP Instance UID, so a destination that did store it after all
    keeps one copy. The job key names the send being repeated: two callers deciding to
    resend the same send (a failure report and a verify job) queue one job.
    """
    now = utcnow()
    row = conn.execute(
        update(Dispatch)
        .where(
            Dispatch.id == dispatch_id,
            Dispatch.state == SENT,
            Dispatch.attempts == send_attempt,
        )
        .values(state=PENDING, last_status=reason, updated_at=now)
        .returning(Dispatch.destination)
    ).one_or_none()
    if row is None:
        return False
    queue.enqueue(
        conn,
        DISPATCH,
        resend_key(dispatch_id, send_attempt),
        max_attempts=max_attempts,
        payload={"dispatch_id": dispatch_id, "destination": row.destination},
    )
    return True


# What apply_commitment_report did.
APPLIED_CONFIRMED = "confirmed"
APPLIED_RESENT = "resent"
APPLIED_UNKNOWN = "unknown-transaction"


def apply_commitment_report(
    conn: Connection, report: CommitmentReport, *, resend_max_attempts: int
) -> tuple[str, int | None]:
    """Confirm or resend the `sent` row that owns the report's Transaction UID.

    Returns (what was done, the Dispatch id); (APPLIED_UNKNOWN, None) when no sent row
    has that transaction (a late report about a send already confirmed or repeated).
    """
    row = conn.execute(
        select(Dispatch.id, Dispatch.attempts).where(
            Dispatch.transaction_uid == report.transaction_uid, Dispatch.state == SENT
        )
    ).one_or_none()
    if row is None:
        return APPLIED_UNKNOWN, None
    if report.success:
        mark_confirmed(conn, row.id, row.attempts, report.describe())
        return APPLIED_CONFIRMED, row.id
    resend(conn, row.id, row.attempts, report.describe(), max_attempts=resend_max_attempts)
    return APPLIED_RESENT, row.id
