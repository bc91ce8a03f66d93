"""Storage Commitment requests modalities send us (we are the SCP), as rows.

Each N-ACTION is a row plus a `commitment-report` job in one transaction, so the report
survives any crash after the N-ACTION was answered. The outcome (what is committed,
what failed and why) is decided once, before the first report goes out, and every
attempt sends that same outcome. Our own requests to a PACS (the `verify` job) live on
the outbox instead (daemon.db.deliveries).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Row, func, insert, select, update

from daemon.db import queue
from daemon.db.keys import COMMITMENT_REPORT, commitment_report_key
from daemon.db.schema import CommitmentRequest, CommitmentState, Job, utcnow

Reference = tuple[str, str]  # (SOP Class UID, SOP Instance UID)
Failure = tuple[str, str, int]  # (SOP Class UID, SOP Instance UID, Failure Reason)


def record_request(
    conn: Connection,
    transaction_uid: str,
    calling_ae: str,
    references: Sequence[Reference],
    *,
    max_attempts: int,
    first_attempt_seconds: float,
) -> tuple[int, str, bool]:
    """Store an N-ACTION and queue its report: (request id, report job key, repeated).

    The job falls due after `first_attempt_seconds`, the time the receiver has to claim
    it first. The same Transaction UID from the same AE again (a modality that never got
    our report) replaces what is asked and is reported again.
    """
    now = utcnow()
    requested = [list(r) for r in dict.fromkeys(references)]
    existing = conn.execute(
        select(CommitmentRequest.id).where(
            CommitmentRequest.calling_ae == calling_ae,
            CommitmentRequest.transaction_uid == transaction_uid,
        )
    ).scalar_one_or_none()
    if existing is None:
        request_id = conn.execute(
            insert(CommitmentRequest)
            .values(
                transaction_uid=transaction_uid,
                calling_ae=calling_ae[:16],
                state=CommitmentState.PENDING,
                requested=requested,
                received_at=now,
            )
            .returning(CommitmentRequest.id)
        ).scalar_one()
    else:
        request_id = existing
        conn.execute(
            update(CommitmentRequest)
            .where(CommitmentRequest.id == request_id)
            .values(
                state=CommitmentState.PENDING,
                requested=requested,
                committed=None,
                failed=None,
                decided_at=None,
                reported_at=None,
                received_at=now,
            )
        )
    prefix = f"{COMMITMENT_REPORT}:{request_id}:"
    earlier = conn.execute(
        select(func.count()).select_from(Job).where(Job.key.like(prefix + "%"))
    ).scalar_one()
    key = commitment_report_key(request_id, earlier + 1)
    queue.enqueue(
        conn,
        COMMITMENT_REPORT,
        key,
        max_attempts=max_attempts,
        payload={"request_id": request_id, "calling_ae": calling_ae},
        run_after=now + dt.timedelta(seconds=first_attempt_seconds),
    )
    return request_id, key, existing is not None


def counts(conn: Connection) -> dict[str, int]:
    """Requests by state (every state named, zeros included), for an operator's glance."""
    found = dict(
        conn.execute(
            select(CommitmentRequest.state, func.count()).group_by(CommitmentRequest.state)
        ).all()
    )
    return {str(state): int(found.get(state, 0)) for state in CommitmentState}


def load(conn: Connection, request_id: int) -> Row[Any] | None:
    """The request's row."""
    return conn.execute(
        select(CommitmentRequest).where(CommitmentRequest.id == request_id)
    ).one_or_none()


def save_outcome(
    conn: Connection, request_id: int, committed: Sequence[Reference], failed: Sequence[Failure]
) -> None:
    """Record what the report says, unless an earlier attempt decided already."""
    conn.execute(
        update(CommitmentRequest)
        .where(CommitmentRequest.id == request_id, CommitmentRequest.decided_at.is_(None))
        .values(
            committed=[list(r) for r in committed],
            failed=[list(f) for f in failed],
            decided_at=utcnow(),
        )
    )


def mark(conn: Connection, request_id: int, state: CommitmentState, detail: str) -> None:
    """The report was delivered (REPORTED) or given up (DEAD); `detail` says how."""
    values: dict[str, Any] = {"state": state, "last_status": detail}
    if state == CommitmentState.REPORTED:
        values["reported_at"] = utcnow()
    conn.execute(
        update(CommitmentRequest).where(CommitmentRequest.id == request_id).values(**values)
    )
