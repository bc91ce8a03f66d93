"""The `dispatch` job: send one outbox row (a report to one destination) and record the result.

The worker claims the job and calls `run_dispatch`; on `DispatchFailed` it calls
`queue.fail(..., permanent=not exc.retryable)` and, when that returns "dead",
`mark_dead(engine, dispatch_id_of(job), reason)` so the outbox row shows it too.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Connection, Engine, select, update

from daemon.config import ConfigError, Settings
from daemon.db import audit, queue
from daemon.db.keys import DISPATCH
from daemon.db.queue import ClaimedJob
from daemon.db.schema import Dispatch, DispatchState, Report, Study, utcnow
from daemon.dicom.network import AssociationOptions
from daemon.dispatch.destinations import AnyDestination, send
from daemon.dispatch.scu import SendOutcome
from daemon.dispatch.verify import enqueue_verify, new_transaction_uid
from daemon.logsetup import kv

log = logging.getLogger(__name__)

JOB_KIND = DISPATCH  # its key: daemon.db.keys.dispatch_key(dispatch_id)
PAYLOAD_KEY = "dispatch_id"

# A job for a row in these states has nothing left to send: it completes at once.
FINISHED_STATES = (DispatchState.SENT, DispatchState.CONFIRMED, DispatchState.CANCELLED)
# States a (re)run sends from: a dead row comes back when an operator retries its job.
SENDABLE_STATES = (DispatchState.PENDING, DispatchState.DEAD)


class DispatchFailed(Exception):
    """This attempt did not deliver; `retryable` False means resending cannot help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def dispatch_id_of(job: ClaimedJob) -> int:
    """The Dispatch row id a `dispatch` job is about."""
    try:
        return int(job.payload[PAYLOAD_KEY])
    except (KeyError, TypeError, ValueError) as exc:
        raise DispatchFailed(
            f"job {job.id}: payload has no {PAYLOAD_KEY}", retryable=False
        ) from exc


def _report_path(stored: str, settings: Settings) -> Path:
    """Report paths are stored absolute, or relative to the spool directory."""
    path = Path(stored)
    return path if path.is_absolute() else settings.storage.spool_dir / path


def run_dispatch(engine: Engine, job: ClaimedJob, settings: Settings) -> None:
    """Send the job's report to its destination; mark it sent and the job done in one commit.

    Raises
    ------
    DispatchFailed
        The send failed; the attempt and last status are already on the Dispatch row.
    daemon.db.queue.LeaseLost
        The job was taken from us meanwhile; nothing was recorded (another worker resends
        the same SOP Instance UID, which a PACS stores once).
    """
    dispatch_id = dispatch_id_of(job)
    with engine.connect() as conn:
        row = conn.execute(
            select(Dispatch.state, Dispatch.destination, Report.path, Report.fallback_path)
            .join(Report, Report.id == Dispatch.report_id)
            .where(Dispatch.id == dispatch_id)
        ).one_or_none()
    if row is None:
        raise DispatchFailed(f"dispatch {dispatch_id} does not exist", retryable=False)

    if row.state in FINISHED_STATES:
        log.info("nothing to send", extra=kv(dispatch=dispatch_id, state=row.state))
        with engine.begin() as conn:
            queue.complete(conn, job.id, job.lease_owner)
        return

    try:
        destination = settings.destination(row.destination)
    except ConfigError as exc:
        _record_failure(engine, dispatch_id, str(exc))
        raise DispatchFailed(str(exc), retryable=False) from exc

    outcome = send(
        destination,
        _report_path(row.path, settings),
        _report_path(row.fallback_path, settings) if row.fallback_path else None,
        settings.dicom.ae_title,
        AssociationOptions.from_settings(settings.dicom),
    )
    if outcome.ok:
        _record_success(engine, job, dispatch_id, outcome, destination)
        return
    _record_failure(engine, dispatch_id, outcome.detail)
    # The worker logs the failed attempt once, with its next try.
    raise DispatchFailed(f"{destination.name}: {outcome.detail}", retryable=outcome.retryable)


def _record_success(
    engine: Engine,
    job: ClaimedJob,
    dispatch_id: int,
    outcome: SendOutcome,
    destination: AnyDestination,
) -> None:
    """Mark the row sent, queue its verify job (unless verify is none), complete: one commit.

    Each send to a commitment destination gets a fresh Transaction UID, so a late report
    about an earlier send cannot settle this one.
    """
    now = utcnow()
    with engine.begin() as conn:
        send_attempt = conn.execute(
            update(Dispatch)
            .where(Dispatch.id == dispatch_id)
            .values(
                state=DispatchState.SENT,
                sent_at=now,
                sent_sop_class_uid=outcome.sop_class_uid,
                last_status=outcome.detail,
                attempts=Dispatch.attempts + 1,
                transaction_uid=new_transaction_uid(destination),
                confirmed_at=None,
                updated_at=now,
            )
            .returning(Dispatch.attempts)
        ).scalar_one()
        if outcome.sop_class_uid and outcome.sop_instance_uid:
            enqueue_verify(
                conn,
                dispatch_id,
                send_attempt,
                destination,
                outcome.sop_class_uid,
                outcome.sop_instance_uid,
            )
        queue.complete(conn, job.id, job.lease_owner)
        study_uid = _audit_delivery(conn, dispatch_id, outcome)  # last: see daemon.db.audit
    log.info(
        "report sent",
        extra=kv(
            dispatch=dispatch_id,
            destination=destination.name,
            study=study_uid,
            sop_instance=outcome.sop_instance_uid,
            sop_class=outcome.sop_class_uid,
            fallback=outcome.fallback_used,
            status=outcome.detail,
        ),
    )


def _audit_delivery(conn: Connection, dispatch_id: int, outcome: SendOutcome) -> str:
    """Audit which SR (the fallback's UID when it went instead) reached which destination;
    returns the study's UID."""
    row = conn.execute(
        select(Study.study_uid, Report.sop_instance_uid, Report.study_version, Dispatch.destination)
        .join(Report, Report.id == Dispatch.report_id)
        .join(Study, Study.id == Report.study_id)
        .where(Dispatch.id == dispatch_id)
    ).one()
    audit.record(
        conn,
        audit.SR_DELIVERED,
        study_uid=row.study_uid,
        sr_uid=outcome.sop_instance_uid or row.sop_instance_uid,
        sop_class_uid=outcome.sop_class_uid,
        study_version=row.study_version,
        destination=row.destination,
        dispatch=dispatch_id,
    )
    return str(row.study_uid)


def _record_failure(engine: Engine, dispatch_id: int, status: str) -> None:
    """Count the attempt, keep the reason; a dead row an operator revived is pending again."""
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            update(Dispatch)
            .where(Dispatch.id == dispatch_id, Dispatch.state.in_(SENDABLE_STATES))
            .values(
                state=DispatchState.PENDING,
                last_status=status,
                attempts=Dispatch.attempts + 1,
                updated_at=now,
            )
        )


def mark_dead(engine: Engine, dispatch_id: int, reason: str | None = None) -> bool:
    """The job gave up: mark the pending row dead so status shows the undelivered report."""
    now = utcnow()
    values: dict[str, object] = {"state": DispatchState.DEAD, "updated_at": now}
    if reason is not None:
        values["last_status"] = reason
    with engine.begin() as conn:
        res = conn.execute(
            update(Dispatch)
            .where(Dispatch.id == dispatch_id, Dispatch.state == DispatchState.PENDING)
            .values(**values)
        )
    return res.rowcount == 1
