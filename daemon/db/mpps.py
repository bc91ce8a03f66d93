"""MPPS steps as rows: created, set, found by study, taken into account once, expired.

The receiver (daemon.receive.mpps) writes them; the assembler (daemon.assemble) reads
them to decide when a study is done and marks each final step with the study version
whose closing took it into account. Everything runs in the caller's transaction.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import ColumnElement, Connection, Row, select, update

from daemon.db.queue import dialect_insert
from daemon.db.schema import MppsState, MppsStep, utcnow
from daemon.dicom.mpps import StepCreated, StepSet, check_final

FINAL = (MppsState.COMPLETED, MppsState.DISCONTINUED)


class SetOutcome(enum.StrEnum):
    """What an N-SET did to the stored step."""

    APPLIED = "applied"
    UNKNOWN = "unknown"  # no step with that SOP Instance UID
    ENDED = "ended"  # the step is COMPLETED or DISCONTINUED: it may no longer be updated


def create_step(conn: Connection, step: StepCreated, calling_ae: str) -> bool:
    """Store a new step; False when one with its SOP Instance UID exists (a duplicate)."""
    now = utcnow()
    inserted = conn.execute(
        dialect_insert(conn)(MppsStep)
        .values(
            sop_instance_uid=step.sop_instance_uid,
            calling_ae=calling_ae[:16],
            study_uid=step.study_uid,
            state=step.state,
            performed=step.performed.as_json(),
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        .returning(MppsStep.id)
    ).first()
    return inserted is not None


def set_step(conn: Connection, sop_instance_uid: str, change: StepSet) -> tuple[SetOutcome, Any]:
    """Apply an N-SET to the stored step: (what happened, the step's row after it).

    Raises daemon.dicom.mpps.MalformedStep when the step would end without its series.
    """
    query = select(MppsStep).where(MppsStep.sop_instance_uid == sop_instance_uid)
    if conn.dialect.name != "sqlite":  # SQLite: the transaction holds the write lock already
        query = query.with_for_update()
    row = conn.execute(query).one_or_none()
    if row is None:
        return SetOutcome.UNKNOWN, None
    if row.state in FINAL:
        return SetOutcome.ENDED, row
    state = change.state or row.state
    performed = row.performed if change.performed is None else change.performed.as_json()
    check_final(state, performed.get("series", []))
    now = utcnow()
    values: dict[str, Any] = {"state": state, "performed": performed, "updated_at": now}
    if state in FINAL:
        values["ended_at"] = now
        values["discontinued_reason"] = (
            change.discontinued_reason if state == MppsState.DISCONTINUED else None
        )
    conn.execute(update(MppsStep).where(MppsStep.id == row.id).values(**values))
    return SetOutcome.APPLIED, conn.execute(select(MppsStep).where(MppsStep.id == row.id)).one()


def live(study_uid: str | ColumnElement[str]) -> ColumnElement[bool]:
    """Steps of the study (a UID, or a column naming it) not yet taken into account nor
    expired: those the assembler still waits on."""
    return (
        (MppsStep.study_uid == study_uid)
        & MppsStep.closed_version.is_(None)
        & MppsStep.expired_at.is_(None)
    )


def ended_steps(conn: Connection, study_uid: str) -> list[Row[Any]]:
    """The study's COMPLETED or DISCONTINUED steps that no closed version took yet."""
    return list(
        conn.execute(
            select(MppsStep).where(live(study_uid), MppsStep.state.in_(FINAL)).order_by(MppsStep.id)
        ).all()
    )


def in_progress(conn: Connection, study_uid: str) -> bool:
    """Whether a modality still performs a step of the study (N-CREATE, no final N-SET)."""
    return (
        conn.execute(
            select(MppsStep.id)
            .where(live(study_uid), MppsStep.state == MppsState.IN_PROGRESS)
            .limit(1)
        ).first()
        is not None
    )


def studies_with_ended_steps(conn: Connection) -> list[str]:
    """Studies some ended step waits on (for the sweep after a restart)."""
    return list(
        conn.execute(
            select(MppsStep.study_uid)
            .where(
                MppsStep.state.in_(FINAL),
                MppsStep.closed_version.is_(None),
                MppsStep.expired_at.is_(None),
            )
            .distinct()
        ).scalars()
    )


def mark_taken(conn: Connection, step_ids: list[int], version: int) -> None:
    """The steps were taken into account by closing `version` (once: never again)."""
    if step_ids:
        conn.execute(
            update(MppsStep)
            .where(MppsStep.id.in_(step_ids), MppsStep.closed_version.is_(None))
            .values(closed_version=version, updated_at=utcnow())
        )


def expire(conn: Connection, before: dt.datetime) -> list[Row[Any]]:
    """Drop steps created before `before` that no version took: their study never came."""
    rows = list(
        conn.execute(
            select(
                MppsStep.id, MppsStep.sop_instance_uid, MppsStep.study_uid, MppsStep.state
            ).where(
                MppsStep.closed_version.is_(None),
                MppsStep.expired_at.is_(None),
                MppsStep.created_at < before,
            )
        ).all()
    )
    if rows:
        conn.execute(
            update(MppsStep)
            .where(MppsStep.id.in_([r.id for r in rows]))
            .values(expired_at=utcnow(), updated_at=utcnow())
        )
    return rows
