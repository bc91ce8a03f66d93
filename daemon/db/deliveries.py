"""Delivery verification on the outbox: confirm a sent report, or send it once more.

Both the `verify` job (daemon.dispatch.verify) and the receiver's Storage Commitment
N-EVENT-REPORT handler (daemon.receive.commitment) change Dispatch rows the same way,
so the rules live here, below both: every function works in the caller's transaction,
on reports already read (daemon.dicom.commitment).

States (daemon.db.schema.DispatchState): a row is `sent` after a C-STORE the peer
took; `confirmed` once the destination proved it keeps the instance (a storage
commitment success or a C-FIND match); back to `pending`, with one more `dispatch`
job queued, when the destination said it failed to keep it or never confirmed it.
"""

from __future__ import annotations

from sqlalchemy import Connection, select, update

from daemon.db import queue
from daemon.db.keys import DISPATCH, resend_key
from daemon.db.schema import Dispatch, DispatchState, utcnow
from daemon.dicom.commitment import CommitmentReport

# Destination.verify values (daemon.config.Destination).
VERIFY_NONE = "none"
VERIFY_FIND = "find"
VERIFY_COMMITMENT = "commitment"
VERIFY_QIDO = "qido"


def mark_confirmed(conn: Connection, dispatch_id: int, send_attempt: int, detail: str) -> bool:
    """`sent` -> `confirmed` for the send numbered `send_attempt`; False if the row moved on."""
    now = utcnow()
    res = conn.execute(
        update(Dispatch)
        .where(
            Dispatch.id == dispatch_id,
            Dispatch.state == DispatchState.SENT,
            Dispatch.attempts == send_attempt,
        )
        .values(state=DispatchState.CONFIRMED, confirmed_at=now, last_status=detail, updated_at=now)
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
            Dispatch.state == DispatchState.SENT,
            Dispatch.attempts == send_attempt,
        )
        .values(state=DispatchState.PENDING, last_status=reason, updated_at=now)
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
            Dispatch.transaction_uid == report.transaction_uid, Dispatch.state == DispatchState.SENT
        )
    ).one_or_none()
    if row is None:
        return APPLIED_UNKNOWN, None
    if report.success:
        mark_confirmed(conn, row.id, row.attempts, report.describe())
        return APPLIED_CONFIRMED, row.id
    resend(conn, row.id, row.attempts, report.describe(), max_attempts=resend_max_attempts)
    return APPLIED_RESENT, row.id
