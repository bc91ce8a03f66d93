"""The console's reads: one function per page part, each a few indexed queries.

Every query here is bounded by an index range or a page (the plan test in
tests/integration/http/console checks each one with EXPLAIN on both databases): a page
costs the same with ten studies or a million instances. Nothing here writes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, Integer, cast, func, select

from daemon.assemble.rules import Waits
from daemon.db import queue
from daemon.db.keys import COMMITMENT_REPORT
from daemon.db.schema import (
    ClosedVersion,
    Dispatch,
    Instance,
    Job,
    JobState,
    Report,
    ReportKind,
    Result,
    Series,
    Study,
    utcnow,
)
from daemon.http.console.stages import WAITING, in_stage, stage_of, stages, waiting_for
from daemon.status import dead_letters

PAGE_SIZE = 50
LIVE_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.DEAD)
RATE_WINDOW = dt.timedelta(minutes=5)
CHART_HOURS = 6
CHART_BUCKET_SECONDS = 600


@dataclasses.dataclass(frozen=True)
class StudyFilter:
    """What the Studies page shows: a stage, a calling AE, a modality, a received date range
    (inclusive days, UTC), a study UID, and which page."""

    state: str | None = None
    calling_ae: str | None = None
    modality: str | None = None
    received_from: dt.date | None = None
    received_to: dt.date | None = None
    study_uid: str | None = None
    page: int = 1

    def query(self, **changes: Any) -> dict[str, str]:
        """The page's query string parameters (with `changes`), for links."""
        values = {**dataclasses.asdict(self), **changes}
        return {k: str(v) for k, v in values.items() if v not in (None, "") and v != 1}


@dataclasses.dataclass(frozen=True)
class StudyRow:
    """One line of the Studies page."""

    study_uid: str
    version: int
    first_received_at: dt.datetime
    last_received_at: dt.datetime
    state: str
    waiting_for: str | None  # what a waiting study waits for (stages.waiting_for)
    instances: int
    calling_aes: tuple[str, ...]
    modalities: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class StudyPage:
    rows: list[StudyRow]
    filter: StudyFilter
    has_next: bool


def _study_where(f: StudyFilter, now: dt.datetime, waits: Waits) -> list[Any]:
    where: list[Any] = []
    if f.state:
        where.append(in_stage(stages(now, waits), f.state))
    if f.calling_ae:
        where.append(
            select(Instance.id)
            .where(Instance.study_id == Study.id, Instance.calling_ae == f.calling_ae)
            .exists()
        )
    if f.modality:
        where.append(
            select(Series.id)
            .where(Series.study_id == Study.id, Series.modality == f.modality)
            .exists()
        )
    if f.received_from:
        where.append(Study.last_received_at >= _midnight(f.received_from))
    if f.received_to:
        where.append(Study.last_received_at < _midnight(f.received_to + dt.timedelta(days=1)))
    if f.study_uid:
        where.append(Study.study_uid == f.study_uid)
    return where


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


def _study_columns(now: dt.datetime, waits: Waits) -> tuple[Any, ...]:
    """A study's row as the pages show it: its arrivals, stage and what it waits for."""
    return (
        Study.id,
        Study.study_uid,
        Study.version,
        Study.first_received_at,
        Study.last_received_at,
        stage_of(stages(now, waits)).label("state"),
        waiting_for(now, waits).label("waiting_for"),
    )


def _waiting(row: Any) -> str | None:
    return row.waiting_for if row.state == WAITING else None


def study_page(conn: Connection, f: StudyFilter, waits: Waits) -> StudyPage:
    """Newest first (by last arrival), PAGE_SIZE a page, with each study's stage."""
    now = utcnow()
    newest_first = (Study.last_received_at.desc(), Study.id.desc())
    # The page's ids first: the stage of a study is worked out only for the rows shown, not
    # for every row an OFFSET skips (PostgreSQL computes the select list before the LIMIT).
    page_ids = list(
        conn.execute(
            select(Study.id)
            .where(*_study_where(f, now, waits))
            .order_by(*newest_first)
            .limit(PAGE_SIZE + 1)
            .offset((f.page - 1) * PAGE_SIZE)
        ).scalars()
    )
    ids = page_ids[:PAGE_SIZE]
    shown = conn.execute(
        select(*_study_columns(now, waits)).where(Study.id.in_(ids)).order_by(*newest_first)
    ).all()
    counts = dict(
        conn.execute(
            select(Instance.study_id, func.count())
            .where(Instance.study_id.in_(ids))
            .group_by(Instance.study_id)
        ).all()
    )
    aes = _pairs(conn, Instance.study_id, Instance.calling_ae, ids)
    modalities = _pairs(conn, Series.study_id, Series.modality, ids)
    return StudyPage(
        rows=[
            StudyRow(
                study_uid=r.study_uid,
                version=r.version,
                first_received_at=r.first_received_at,
                last_received_at=r.last_received_at,
                state=r.state,
                waiting_for=_waiting(r),
                instances=int(counts.get(r.id, 0)),
                calling_aes=tuple(aes.get(r.id, ())),
                modalities=tuple(modalities.get(r.id, ())),
            )
            for r in shown
        ],
        filter=f,
        has_next=len(page_ids) > PAGE_SIZE,
    )


def _pairs(conn: Connection, key: Any, value: Any, ids: list[int]) -> dict[int, list[str]]:
    """The distinct values of `value` per study id, sorted."""
    out: dict[int, list[str]] = {}
    for k, v in conn.execute(
        select(key, value).where(key.in_(ids), value.is_not(None)).distinct().order_by(key, value)
    ).all():
        out.setdefault(k, []).append(v)
    return out


@dataclasses.dataclass(frozen=True)
class JobRow:
    """A job as the console lists it, with its study and (for deliveries) destination."""

    id: int
    kind: str
    state: str
    attempts: int
    max_attempts: int
    study_uid: str | None
    destination: str | None  # where it sends: a destination, or a modality's AE title
    error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    run_after: dt.datetime
    payload: dict[str, Any]

    @property
    def seconds(self) -> float | None:
        """From queued to finished (waiting and every attempt included)."""
        if self.finished_at is None:
            return None
        return (self.finished_at - self.created_at).total_seconds()


def _job_rows(conn: Connection, jobs: Sequence[Any]) -> list[JobRow]:
    """JobRows for job rows, with study UIDs and delivery errors fetched in two queries."""
    study_ids = {j.study_id for j in jobs if j.study_id is not None}
    uids = dict(
        conn.execute(select(Study.id, Study.study_uid).where(Study.id.in_(study_ids))).all()
    )
    dispatch_ids = {
        int(j.payload["dispatch_id"]) for j in jobs if (j.payload or {}).get("dispatch_id")
    }
    statuses = dict(
        conn.execute(
            select(Dispatch.id, Dispatch.last_status).where(Dispatch.id.in_(dispatch_ids))
        ).all()
    )
    out = []
    for j in jobs:
        payload = dict(j.payload or {})
        # A delivery's last answer explains a failure, not a success.
        status = statuses.get(payload.get("dispatch_id")) if j.state != JobState.DONE else None
        # A commitment report goes back to the modality that asked.
        to = payload.get("calling_ae") if j.kind == COMMITMENT_REPORT else None
        out.append(
            JobRow(
                id=j.id,
                kind=j.kind,
                state=j.state,
                attempts=j.attempts,
                max_attempts=j.max_attempts,
                study_uid=uids.get(j.study_id),
                destination=payload.get("destination") or to,
                error=j.last_error or status,
                created_at=j.created_at,
                updated_at=j.updated_at,
                finished_at=j.finished_at,
                run_after=j.run_after,
                payload=payload,
            )
        )
    return out


@dataclasses.dataclass(frozen=True)
class ChartBar:
    start: dt.datetime
    instances: int
    reported: int


@dataclasses.dataclass(frozen=True)
class Overview:
    """The database's part of the Overview page."""

    queue: dict[str, dict[str, int]]
    oldest_queued_s: float | None
    dead: list[JobRow]
    dead_total: int
    instances_per_minute: float
    last_instance_at: dt.datetime | None
    studies_24h: int
    last_delivered: dict[str, dt.datetime]
    chart: list[ChartBar]


def _bucket(conn: Connection, column: Any, width: int) -> ColumnElement[int]:
    """`column` (a UTC timestamp) as the number of its `width`-second slot since the epoch."""
    if conn.dialect.name == "sqlite":
        return cast(func.strftime("%s", column), Integer) // width
    return cast(func.floor(func.extract("epoch", column) / width), Integer)


def _per_bucket(
    conn: Connection, column: Any, since: dt.datetime, width: int, *where: Any
) -> dict[int, int]:
    bucket = _bucket(conn, column, width).label("bucket")
    return {
        int(b): int(n)
        for b, n in conn.execute(
            select(bucket, func.count()).where(column >= since, *where).group_by(bucket)
        ).all()
    }


def chart(conn: Connection, now: dt.datetime) -> list[ChartBar]:
    """Instances received and studies reported (SRs written) per 10 minutes, last 6 hours."""
    width = CHART_BUCKET_SECONDS
    first = int(now.timestamp()) // width - CHART_HOURS * 3600 // width + 1
    since = dt.datetime.fromtimestamp(first * width, dt.UTC)
    received = _per_bucket(conn, Instance.received_at, since, width)
    reported = _per_bucket(conn, Report.created_at, since, width, Report.kind == ReportKind.SR)
    return [
        ChartBar(
            dt.datetime.fromtimestamp(b * width, dt.UTC), received.get(b, 0), reported.get(b, 0)
        )
        for b in range(first, first + CHART_HOURS * 3600 // width)
    ]


def overview(conn: Connection, destinations: Sequence[str]) -> Overview:
    """Queue, failures, arrival rate, deliveries and the chart."""
    now = utcnow()
    counts = queue.counts_by_kind_and_state(conn, LIVE_STATES)
    recent = conn.execute(
        select(func.count()).where(Instance.received_at >= now - RATE_WINDOW)
    ).scalar_one()
    last_delivered = {}
    for name in destinations:
        at = conn.execute(
            select(func.max(Dispatch.sent_at)).where(Dispatch.destination == name)
        ).scalar_one()
        if at is not None:
            last_delivered[name] = at
    return Overview(
        queue=counts,
        oldest_queued_s=queue.oldest_queued_age(conn),
        dead=_job_rows(conn, dead_letters(conn, 5)),
        dead_total=sum(states.get(JobState.DEAD, 0) for states in counts.values()),
        instances_per_minute=int(recent) / (RATE_WINDOW.total_seconds() / 60),
        last_instance_at=conn.execute(select(func.max(Instance.received_at))).scalar_one(),
        studies_24h=int(
            conn.execute(
                select(func.count()).where(Study.last_received_at >= now - dt.timedelta(hours=24))
            ).scalar_one()
        ),
        last_delivered=last_delivered,
        chart=chart(conn, now),
    )


@dataclasses.dataclass(frozen=True)
class Failures:
    dead: list[JobRow]
    retrying: list[JobRow]
    page: int
    has_next: bool


def failures(conn: Connection, page: int) -> Failures:
    """Dead jobs (paged, newest first) and jobs that failed and wait for another attempt."""
    dead = dead_letters(conn, PAGE_SIZE + 1, (page - 1) * PAGE_SIZE)
    retrying = conn.execute(
        select(Job)
        .where(Job.state == JobState.QUEUED, Job.last_error.is_not(None))
        .order_by(Job.run_after, Job.id)
        .limit(PAGE_SIZE)
    ).all()
    return Failures(
        dead=_job_rows(conn, dead[:PAGE_SIZE]),
        retrying=_job_rows(conn, retrying),
        page=page,
        has_next=len(dead) > PAGE_SIZE,
    )


def job_exists(conn: Connection, job_id: int) -> bool:
    return conn.execute(select(Job.id).where(Job.id == job_id)).first() is not None


@dataclasses.dataclass(frozen=True)
class VersionRow:
    """What arrived for one version of a study."""

    version: int
    instances: int
    first_at: dt.datetime
    last_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class ClosedRow:
    """Why and when a version stopped taking instances (daemon.assemble's record)."""

    version: int
    reason: str  # a daemon.db.schema.CloseReason
    detail: dict[str, Any]
    closed_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class DeliveryRow:
    report_uid: str
    report_kind: str
    study_version: int
    destination: str
    state: str
    attempts: int
    last_status: str | None
    sent_sop_class_uid: str | None
    sent_at: dt.datetime | None
    confirmed_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class ReportRow:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    kind: str
    study_version: int
    path: str
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class StudyRecord:
    """Every row of one study the Study page shows."""

    id: int
    study_uid: str
    version: int
    state: str
    waiting_for: str | None
    first_received_at: dt.datetime
    last_received_at: dt.datetime
    first_instance_path: str | None
    versions: list[VersionRow]
    closed: list[ClosedRow]
    series: list[tuple[str, str | None, str | None, int]]  # uid, modality, body part, count
    calling_aes: list[str]
    jobs: list[JobRow]
    deliveries: list[DeliveryRow]
    reports: list[ReportRow]
    results: list[Any]


def study_record(conn: Connection, study_uid: str, waits: Waits) -> StudyRecord | None:
    """The study's rows, or None when the UID is unknown."""
    now = utcnow()
    study = conn.execute(
        select(*_study_columns(now, waits)).where(Study.study_uid == study_uid)
    ).one_or_none()
    if study is None:
        return None
    sid = study.id
    versions = [
        VersionRow(int(v), int(n), first, last)
        for v, n, first, last in conn.execute(
            select(
                Instance.study_version,
                func.count(),
                func.min(Instance.received_at),
                func.max(Instance.received_at),
            )
            .where(Instance.study_id == sid)
            .group_by(Instance.study_version)
            .order_by(Instance.study_version)
        ).all()
    ]
    per_series = dict(
        conn.execute(
            select(Instance.series_id, func.count())
            .where(Instance.study_id == sid)
            .group_by(Instance.series_id)
        ).all()
    )
    series = [
        (s.series_uid, s.modality, s.body_part, int(per_series.get(s.id, 0)))
        for s in conn.execute(select(Series).where(Series.study_id == sid).order_by(Series.id))
    ]
    jobs = conn.execute(select(Job).where(Job.study_id == sid).order_by(Job.id)).all()
    reports = [
        ReportRow(
            r.id, r.sop_instance_uid, r.sop_class_uid, r.kind, r.study_version, r.path, r.created_at
        )  # fmt: skip
        for r in conn.execute(select(Report).where(Report.study_id == sid).order_by(Report.id))
    ]
    return StudyRecord(
        id=sid,
        study_uid=study.study_uid,
        version=study.version,
        state=study.state,
        waiting_for=_waiting(study),
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        first_instance_path=conn.execute(
            select(Instance.path)
            .where(Instance.study_id == sid, Instance.deleted_at.is_(None))
            .order_by(Instance.study_id, Instance.study_version)
            .limit(1)
        ).scalar_one_or_none(),
        versions=versions,
        closed=[
            ClosedRow(c.version, c.reason, dict(c.detail or {}), c.closed_at)
            for c in conn.execute(
                select(ClosedVersion)
                .where(ClosedVersion.study_id == sid)
                .order_by(ClosedVersion.version)
            )
        ],
        series=series,
        calling_aes=[
            ae
            for (ae,) in conn.execute(
                select(Instance.calling_ae).where(Instance.study_id == sid).distinct()
            )
        ],
        jobs=_job_rows(conn, jobs),
        deliveries=_deliveries(conn, reports),
        reports=reports,
        results=list(
            conn.execute(select(Result).where(Result.study_id == sid).order_by(Result.id)).all()
        ),
    )


def _deliveries(conn: Connection, reports: list[ReportRow]) -> list[DeliveryRow]:
    by_id = {r.id: r for r in reports}
    rows = conn.execute(
        select(Dispatch).where(Dispatch.report_id.in_(list(by_id))).order_by(Dispatch.id)
    ).all()
    return [
        DeliveryRow(
            report_uid=by_id[d.report_id].sop_instance_uid,
            report_kind=by_id[d.report_id].kind,
            study_version=by_id[d.report_id].study_version,
            destination=d.destination,
            state=d.state,
            attempts=d.attempts,
            last_status=d.last_status,
            sent_sop_class_uid=d.sent_sop_class_uid,
            sent_at=d.sent_at,
            confirmed_at=d.confirmed_at,
        )
        for d in rows
    ]


def heatmap_path(conn: Connection, study_uid: str, sop_instance_uid: str) -> str | None:
    """The spooled file of one heatmap of the study, None when the study has no such one."""
    return conn.execute(
        select(Report.path)
        .join(Study, Study.id == Report.study_id)
        .where(
            Study.study_uid == study_uid,
            Report.sop_instance_uid == sop_instance_uid,
            Report.kind == ReportKind.HEATMAP,
        )
    ).scalar_one_or_none()
