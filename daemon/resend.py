"""`pacs-ai reports send`: put reports in the outbox for a destination, by study or by date.

A destination added to the configuration gets the reports written from then on; the ones
written before reach it only this way. Each chosen report gets an outbox row for the
destination (or its existing row is made pending again) and the ordinary `dispatch` job,
so it is sent, retried and verified like any other; every report queued is audited.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from sqlalchemy import Connection, Engine, Row, func, select

from daemon.config import Settings
from daemon.db import audit
from daemon.db.outbox import add_dispatch, send_again
from daemon.db.schema import REPORT_KIND_NAMES, Dispatch, DispatchState, Report, Study


class NothingToSend(Exception):
    """No report matches what the operator chose; the message says what was looked for."""


@dataclasses.dataclass(frozen=True)
class Queued:
    """One report put in the outbox for the destination, and the state its row was in."""

    study_uid: str
    study_version: int
    sop_instance_uid: str
    kind: str
    dispatch_id: int
    was: str | None  # None: a new row; "pending": already on its way, left as it was

    def __str__(self) -> str:
        how = {None: "queued", DispatchState.PENDING: "already queued"}.get(
            self.was, f"queued again (was {self.was})"
        )
        return (
            f"study {self.study_uid} v{self.study_version} {self.kind} {self.sop_instance_uid}: "
            f"{how} (dispatch {self.dispatch_id})"
        )


def send_reports(
    engine: Engine,
    settings: Settings,
    destination: str,
    *,
    study_uid: str | None = None,
    since: dt.datetime | None = None,
) -> list[Queued]:
    """Queue the latest reports (SR and heatmaps) of one study, or of every study reported
    since `since`, for `destination`; one transaction.

    Raises ConfigError for an unknown destination and `NothingToSend` when nothing matches.
    """
    dest = settings.destination(destination)
    if (study_uid is None) == (since is None):
        raise ValueError("give exactly one of study_uid and since")
    queued: list[Queued] = []
    with engine.begin() as conn:
        for report in _latest_reports(conn, study_uid, since):
            queued.append(_queue_one(conn, report, dest.name, settings.retry.max_attempts))
        if not queued:
            what = f"study {study_uid}" if study_uid else f"since {since:%Y-%m-%d %H:%M} UTC"
            raise NothingToSend(f"no reports for {what}")
        for item in queued:  # last: see daemon.db.audit
            if item.was != DispatchState.PENDING:
                audit.record(
                    conn,
                    audit.REPORT_SEND_REQUESTED,
                    study_uid=item.study_uid,
                    sr_uid=item.sop_instance_uid,
                    study_version=item.study_version,
                    destination=dest.name,
                    dispatch=item.dispatch_id,
                )
    return queued


def _latest_reports(
    conn: Connection, study_uid: str | None, since: dt.datetime | None
) -> list[Row[Any]]:
    """Reports of each chosen study's latest reported version (older ones are superseded)."""
    latest = (
        select(Report.study_id, func.max(Report.study_version).label("version"))
        .group_by(Report.study_id)
        .subquery()
    )
    stmt = (
        select(
            Report.id,
            Report.study_id,
            Report.study_version,
            Report.sop_instance_uid,
            Report.kind,
            Study.study_uid,
        )
        .join(Study, Study.id == Report.study_id)
        .join(
            latest,
            (latest.c.study_id == Report.study_id) & (latest.c.version == Report.study_version),
        )
        .order_by(Report.id)
    )
    if study_uid is not None:
        stmt = stmt.where(Study.study_uid == study_uid)
    else:
        recent = select(Report.study_id).where(Report.created_at >= since)
        stmt = stmt.where(Report.study_id.in_(recent))
    return list(conn.execute(stmt).all())


def _queue_one(conn: Connection, report: Row[Any], destination: str, max_attempts: int) -> Queued:
    """A new outbox row, or the existing one pending again (a pending one is on its way)."""
    row = conn.execute(
        select(Dispatch.id, Dispatch.state).where(
            Dispatch.report_id == report.id, Dispatch.destination == destination
        )
    ).one_or_none()
    if row is None:
        dispatch_id = add_dispatch(conn, report.id, report.study_id, destination, max_attempts)
        was = None
    else:
        dispatch_id, was = row.id, row.state
        if was != DispatchState.PENDING:
            send_again(conn, dispatch_id, report.study_id, destination, max_attempts)
    return Queued(
        study_uid=report.study_uid,
        study_version=report.study_version,
        sop_instance_uid=report.sop_instance_uid,
        kind=REPORT_KIND_NAMES.get(report.kind, report.kind),
        dispatch_id=dispatch_id,
        was=was,
    )
