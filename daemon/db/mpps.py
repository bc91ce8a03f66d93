"""MPPS steps as rows: created, set, found by study, taken into account once, expired.

The receiver (daemon.receive.mpps) writes them; the assembler (daemon.assemble) reads
them to decide when a study is done and marks each final step with the study version
whose closing took it into account. A step belongs to every study it was scheduled for
(its `mpps_step_studies` rows) and to any study holding a series it made (its
`mpps_step_series` rows). Everything runs in the caller's transaction.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    case,
    delete,
    exists,
    func,
    insert,
    select,
    union,
    update,
)

from daemon.db.queue import dialect_insert
from daemon.db.schema import (
    MppsState,
    MppsStep,
    MppsStepSeries,
    MppsStepStudy,
    Series,
    Study,
    utcnow,
)
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
    if inserted is None:
        return False
    conn.execute(
        insert(MppsStepStudy),
        [{"step_id": inserted.id, "study_uid": uid} for uid in dict.fromkeys(step.studies)],
    )
    _keep_series(conn, inserted.id, step.performed.series)
    return True


def _keep_series(conn: Connection, step_id: int, series: Sequence[str]) -> None:
    """The step's series rows: exactly `series`."""
    conn.execute(delete(MppsStepSeries).where(MppsStepSeries.step_id == step_id))
    if series:
        conn.execute(
            insert(MppsStepSeries),
            [{"step_id": step_id, "series_uid": uid} for uid in dict.fromkeys(series)],
        )


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
    if change.performed is not None:
        _keep_series(conn, row.id, change.performed.series)
    return SetOutcome.APPLIED, conn.execute(select(MppsStep).where(MppsStep.id == row.id)).one()


def _waited_on(states: Sequence[str]) -> ColumnElement[bool]:
    """A step in one of `states` that no closed version took yet nor expired."""
    return (
        MppsStep.state.in_(list(states))
        & MppsStep.closed_version.is_(None)
        & MppsStep.expired_at.is_(None)
    )


def waiting_on(
    study_uid: str | ColumnElement[str], study_id: int | ColumnElement[int], states: Sequence[str]
) -> ColumnElement[bool]:
    """Whether a step of the study (its UID and id: values, or columns naming them) in one of
    `states` still counts for the assembler. A step is the study's when it was scheduled for
    it or made a series the study holds; each way is its own EXISTS, so each is answered
    from an index."""
    named = exists().where(
        MppsStepStudy.study_uid == study_uid,
        MppsStep.id == MppsStepStudy.step_id,
        _waited_on(states),
    )
    made = exists().where(
        Series.study_id == study_id,
        MppsStepSeries.series_uid == Series.series_uid,
        MppsStep.id == MppsStepSeries.step_id,
        _waited_on(states),
    )
    return named | made


def ended_steps(conn: Connection, study_uid: str, study_id: int) -> list[Row[Any]]:
    """The study's COMPLETED or DISCONTINUED steps that no closed version took yet (see
    `waiting_on` for which steps are the study's)."""
    ids = union(
        select(MppsStepStudy.step_id).where(MppsStepStudy.study_uid == study_uid),
        select(MppsStepSeries.step_id)
        .join(Series, Series.series_uid == MppsStepSeries.series_uid)
        .where(Series.study_id == study_id),
    )
    return list(
        conn.execute(
            select(MppsStep).where(MppsStep.id.in_(ids), _waited_on(FINAL)).order_by(MppsStep.id)
        ).all()
    )


def in_progress(conn: Connection, study_uid: str, study_id: int) -> bool:
    """Whether a modality still performs a step of the study (N-CREATE, no final N-SET)."""
    return bool(
        conn.execute(select(waiting_on(study_uid, study_id, (MppsState.IN_PROGRESS,)))).scalar()
    )


def _studies(conn: Connection, steps: ColumnElement[bool]) -> list[str]:
    """The studies of the steps matching `steps`: those they were scheduled for and those
    holding a series they made."""
    named = (
        select(MppsStepStudy.study_uid)
        .join(MppsStep, MppsStep.id == MppsStepStudy.step_id)
        .where(steps)
    )
    holding = (
        select(Study.study_uid)
        .join(Series, Series.study_id == Study.id)
        .join(MppsStepSeries, MppsStepSeries.series_uid == Series.series_uid)
        .join(MppsStep, MppsStep.id == MppsStepSeries.step_id)
        .where(steps)
    )
    return sorted(conn.execute(union(named, holding)).scalars())


def studies_of(conn: Connection, step_id: int) -> list[str]:
    """The studies a step may close (for the assembler, when it ends)."""
    return _studies(conn, MppsStep.id == step_id)


def studies_with_ended_steps(conn: Connection) -> list[str]:
    """Studies some ended step waits on (for the sweep after a restart)."""
    return _studies(conn, _waited_on(FINAL))


def counts(conn: Connection) -> dict[str, int]:
    """Steps by where they stand for the assembler, for an operator's glance: performed now,
    ended and waiting for the images they name, taken by a closed version, expired."""
    where = case(
        (MppsStep.expired_at.is_not(None), "expired"),
        (MppsStep.closed_version.is_not(None), "taken"),
        (MppsStep.state == MppsState.IN_PROGRESS, "in progress"),
        else_="waiting for images",
    )
    found = dict(conn.execute(select(where, func.count()).group_by(where)).all())
    named = ("in progress", "waiting for images", "taken", "expired")
    return {name: int(found.get(name, 0)) for name in named}


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
