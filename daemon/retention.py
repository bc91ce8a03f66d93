"""Spool retention: a study's instance files go a set time after its latest SR was delivered.

A study is purged once `[storage] retention_days` (0 = never) have passed since every
configured destination confirmed its latest SR, never earlier. "Confirmed" means the
Dispatch row is `confirmed` (the destination's storage commitment or C-FIND check said
so), or `sent` for a destination whose `verify` is `none` (no check is configured, so the
successful C-STORE is all the confirmation there will be). With no destinations
configured nothing is purged by this rule; a study with new instances, or with a job
still queued, running or dead, waits. The instances rows stay (`deleted_at` is set) and
the files go durably, set-aside older versions with them; the SR files stay.

Only instances of the versions the confirmed SR covers go: one that arrived since (and
that a modality may have been told is committed, daemon.receive.commitment_scp) stays
until an SR covering it is confirmed, even if it arrives while a purge runs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path
from typing import Any

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import Connection, Engine, Row, exists, select, update

from daemon.config import Destination, Settings
from daemon.db import audit
from daemon.db.deliveries import VERIFY_NONE
from daemon.db.schema import (
    Dispatch,
    DispatchState,
    Instance,
    Job,
    JobState,
    Report,
    ReportKind,
    Study,
    utcnow,
)
from daemon.logsetup import kv
from daemon.spool import Spool

log = logging.getLogger(__name__)

RUN_EVERY_SECONDS = 3600.0
# A job in one of these may still run (a dead one on an operator's retry).
UNFINISHED_JOB_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.DEAD)


@dataclasses.dataclass(frozen=True)
class Purged:
    """One study whose instance files were removed."""

    study_uid: str
    files: int
    report_uid: str


def confirmed_at(dispatch: Row[Any], destination: Destination) -> dt.datetime | None:
    """When the destination confirmed this SR, or None while it has not."""
    if dispatch.state == DispatchState.CONFIRMED:
        return dispatch.confirmed_at or dispatch.updated_at
    if dispatch.state == DispatchState.SENT and destination.verify == VERIFY_NONE:
        return dispatch.sent_at or dispatch.updated_at
    return None


def _latest_sr(conn: Connection, study_id: int) -> Row[Any] | None:
    """The SR of the study's newest reported version: only its delivery counts."""
    return conn.execute(
        select(Report)
        .where(Report.study_id == study_id, Report.kind == ReportKind.SR)
        .order_by(Report.study_version.desc(), Report.id.desc())
        .limit(1)
    ).one_or_none()


def _delivered_at(conn: Connection, report_id: int, settings: Settings) -> dt.datetime | None:
    """When the last configured destination confirmed the report; None until all have."""
    rows = {
        d.destination: d
        for d in conn.execute(select(Dispatch).where(Dispatch.report_id == report_id)).all()
    }
    times = []
    for dest in settings.destinations:
        row = rows.get(dest.name)
        when = confirmed_at(row, dest) if row is not None else None
        if when is None:
            return None
        times.append(when)
    return max(times) if times else None


def _busy(conn: Connection, study_id: int, version: int) -> bool:
    """Whether the study still has work that may need its files."""
    newer = conn.execute(
        select(
            exists().where(
                Instance.study_id == study_id,
                Instance.study_version > version,
                Instance.deleted_at.is_(None),
            )
        )
    ).scalar_one()
    jobs = conn.execute(
        select(exists().where(Job.study_id == study_id, Job.state.in_(UNFINISHED_JOB_STATES)))
    ).scalar_one()
    return bool(newer or jobs)


def due_studies(
    conn: Connection, settings: Settings, now: dt.datetime
) -> list[tuple[int, str, Row[Any]]]:
    """(study id, UID, latest SR) of each study whose files are due to go."""
    days = settings.storage.retention_days
    if days <= 0 or not settings.destinations:
        return []
    cutoff = now - dt.timedelta(days=days)
    candidates = conn.execute(
        select(Study.id, Study.study_uid).where(
            exists().where(Instance.study_id == Study.id, Instance.deleted_at.is_(None)),
            exists().where(Report.study_id == Study.id),
        )
    ).all()
    due = []
    for study_id, study_uid in candidates:
        report = _latest_sr(conn, study_id)
        if report is None or _busy(conn, study_id, report.study_version):
            continue
        delivered = _delivered_at(conn, report.id, settings)
        if delivered is not None and delivered <= cutoff:
            due.append((study_id, study_uid, report))
    return due


def purge_study(
    engine: Engine, spool: Spool, study_id: int, study_uid: str, report: Row[Any]
) -> int:
    """Remove the study's instance files durably, then mark their rows; returns the count.

    Files go first: a crash in between leaves rows whose files are already gone, which the
    next run removes (a no-op) and marks; the other order could leak files for good. Only
    the versions the report covers go (a later instance waits for its own SR).
    """
    with engine.connect() as conn:
        rows = conn.execute(
            select(Instance.id, Instance.path).where(
                Instance.study_id == study_id,
                Instance.study_version <= report.study_version,
                Instance.deleted_at.is_(None),
            )
        ).all()
    removed: list[int] = []
    for instance_id, stored in rows:
        path = Path(stored)
        path = path if path.is_absolute() else spool.root / path
        if not path.is_relative_to(spool.root):
            log.warning(
                "instance file outside the spool left alone",
                extra=kv(study=study_uid, instance=instance_id, path=str(path)),
            )
            continue
        spool.remove(path)
        removed.append(instance_id)
    spool.drop_cache(study_uid)  # what analysis kept is derived from the files just removed
    if not removed:
        return 0
    with engine.begin() as conn:
        conn.execute(
            update(Instance)
            .where(Instance.id.in_(removed), Instance.deleted_at.is_(None))
            .values(deleted_at=utcnow())
        )
        audit.record(  # last: see daemon.db.audit
            conn,
            audit.SPOOL_PURGED,
            study_uid=study_uid,
            files=len(removed),
            report=report.sop_instance_uid,
            study_version=report.study_version,
        )
    return len(removed)


def purge_due(
    engine: Engine, spool: Spool, settings: Settings, now: dt.datetime | None = None
) -> list[Purged]:
    """Purge every study that is due (the scheduled job; tests call it with their `now`)."""
    with engine.connect() as conn:
        due = due_studies(conn, settings, now or utcnow())
    done = []
    for study_id, study_uid, report in due:
        files = purge_study(engine, spool, study_id, study_uid, report)
        if files:
            log.info("spool purged", extra=kv(study=study_uid, files=files))
            done.append(Purged(study_uid, files, report.sop_instance_uid))
    return done


def schedule(scheduler: BaseScheduler, engine: Engine, spool: Spool, settings: Settings) -> None:
    """Run `purge_due` every hour (only when retention is configured)."""
    if settings.storage.retention_days <= 0:
        return
    scheduler.add_job(
        purge_due,
        "interval",
        seconds=RUN_EVERY_SECONDS,
        args=[engine, spool, settings],
        id="retention",
        coalesce=True,
        max_instances=1,
    )
