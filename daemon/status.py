"""What an operator asks of a running installation: counts, ages, dead letters, one job."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from daemon import __version__
from daemon.config import DicomWebDestination, Settings
from daemon.db import audit, commitments, migrate, mpps, queue
from daemon.db.deliveries import VERIFY_NONE
from daemon.db.keys import COMMITMENT_REPORT
from daemon.db.schema import (
    REPORT_KIND_NAMES,
    ClosedVersion,
    CommitmentRequest,
    CommitmentState,
    Dispatch,
    DispatchState,
    Instance,
    Job,
    JobState,
    Report,
    Result,
    Study,
    utcnow,
)


def _engine(settings: Settings) -> Engine:
    """The configured database, which must exist and be at head: nothing here creates it."""
    return migrate.open_at_head(settings.storage.effective_database_url)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _job_row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "key": job.key,
        "state": job.state,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "run_after": _iso(job.run_after),
        "lease_owner": job.lease_owner,
        "lease_expires_at": _iso(job.lease_expires_at),
        "last_error": job.last_error,
        "payload": job.payload,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "finished_at": _iso(job.finished_at),
    }


def _spool_free(settings: Settings) -> int | None:
    path = settings.storage.spool_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _retrying_row(job: Any) -> dict[str, Any]:
    """A job waiting for its next try: what it is, where it goes, when, and why it failed."""
    return {
        "id": job.id,
        "kind": job.kind,
        "key": job.key,
        "destination": (job.payload or {}).get("destination"),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "next_attempt": _utc(job.run_after).isoformat(timespec="seconds"),
        "next_attempt_in_s": round((_utc(job.run_after) - utcnow()).total_seconds()),
        "last_error": job.last_error,
    }


def _utc(value: dt.datetime) -> dt.datetime:
    """A stored time as aware UTC (SQLite hands it back naive)."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _database_status(conn: Connection) -> dict[str, Any]:
    def count(col: Any, *where: Any) -> int:
        return int(conn.execute(select(func.count(col)).where(*where)).scalar_one())

    dispatches = dict(
        conn.execute(select(Dispatch.state, func.count()).group_by(Dispatch.state)).all()
    )
    waiting, soonest = queue.waiting_for_retry(conn)
    return {
        "studies": count(Study.id),
        "instances": count(Instance.id, Instance.superseded_at.is_(None)),
        "reports": count(Report.id),
        "jobs": queue.counts_by_kind_and_state(conn),
        "oldest_queued_age_s": queue.oldest_queued_age(conn),
        "waiting_for_retry": waiting,
        "retrying": [_retrying_row(j) for j in soonest],
        "dispatches": {k: int(v) for k, v in dispatches.items()},
        "last_instance_received": _iso(
            conn.execute(select(func.max(Instance.received_at))).scalar_one()
        ),
        "last_sr_delivered": _iso(conn.execute(select(func.max(Dispatch.sent_at))).scalar_one()),
        "dead_letters": [
            {"id": j.id, "kind": j.kind, "key": j.key, "last_error": j.last_error}
            for j in dead_letters(conn, 10)
        ],
        "mpps_steps": mpps.counts(conn),
        "storage_commitments": commitments.counts(conn),
    }


def dead_letters(conn: Connection, limit: int, offset: int = 0) -> list[Any]:
    """Dead jobs, the most recently failed first (they wait for an operator)."""
    return list(
        conn.execute(
            select(Job)
            .where(Job.state == JobState.DEAD)
            .order_by(Job.updated_at.desc(), Job.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
    )


def _delivery_counts(conn: Connection, settings: Settings) -> dict[str, int]:
    """Confirmed reports, and sent ones a verifying destination has not confirmed yet."""
    verifying = [d.name for d in settings.destinations if d.verify != VERIFY_NONE]
    confirmed = conn.execute(
        select(func.count(Dispatch.id)).where(Dispatch.state == DispatchState.CONFIRMED)
    ).scalar_one()
    unconfirmed = conn.execute(
        select(func.count(Dispatch.id)).where(
            Dispatch.state == DispatchState.SENT, Dispatch.destination.in_(verifying)
        )
    ).scalar_one()
    return {"confirmed": int(confirmed), "unconfirmed": int(unconfirmed)}


def collect_status(settings: Settings, *, echo: bool = True) -> dict[str, Any]:
    """Everything `pacs-ai status` shows, as plain data (the JSON form)."""
    engine = _engine(settings)
    try:
        revision = migrate.current_revision(engine)
        report: dict[str, Any] = {
            "version": __version__,
            "database": engine.url.render_as_string(hide_password=True),
            "schema_revision": revision,
            "schema_at_head": True,  # `_engine` refuses any other database
        }
        with engine.connect() as conn:
            report.update(_database_status(conn))
            report["deliveries"] = _delivery_counts(conn, settings)
        report["destinations"] = [
            _destination(settings, dest, echo, engine) for dest in settings.destinations
        ]
    finally:
        engine.dispose()
    report["spool_dir"] = str(settings.storage.spool_dir)
    report["spool_free_bytes"] = _spool_free(settings)
    return report


def _destination(
    settings: Settings, dest: Any, echo: bool, recorder: Engine | None
) -> dict[str, Any]:
    """A destination's address and, when `echo`, its answer (recorded, as the console shows)."""
    from daemon.dispatch import probes
    from daemon.dispatch.destinations import echo as probe

    entry: dict[str, Any] = {"name": dest.name, "kind": dest.kind}
    if isinstance(dest, DicomWebDestination):
        entry["address"] = dest.url
    else:
        entry.update(ae_title=dest.ae_title, address=f"{dest.host}:{dest.port}")
    if echo:
        outcome = probe(dest, settings.dicom.ae_title)
        if recorder is not None:
            probes.record(recorder, dest.name, outcome)
        entry["echo"] = str(outcome)
        entry["echo_ok"] = outcome.ok
    return entry


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def render_status(report: dict[str, Any]) -> str:
    """A short table a person reads at a glance."""
    lines = [f"pacs-ai {report['version']}   database {report['database']}"]
    lines.append(
        f"  studies {report['studies']}   instances {report['instances']}   "
        f"reports {report['reports']}"
    )
    age = report["oldest_queued_age_s"]
    waiting = report["waiting_for_retry"]
    lines.append(
        f"  oldest queued job: {'none' if age is None else f'{age:.0f} s'}"
        f"{f' ({waiting} waiting for retry)' if waiting else ''}   "
        f"last instance: {report['last_instance_received'] or 'never'}   "
        f"last SR delivered: {report['last_sr_delivered'] or 'never'}"
    )
    lines.append("  jobs:")
    for kind, states in sorted(report["jobs"].items()):
        text = "  ".join(f"{s} {n}" for s, n in sorted(states.items()))
        lines.append(f"    {kind:<10} {text}")
    disp = "  ".join(f"{s} {n}" for s, n in sorted(report["dispatches"].items()))
    lines.append(f"  dispatches: {disp or 'none'}")
    deliveries = report.get("deliveries", {})
    lines.append(
        f"  deliveries: confirmed {deliveries.get('confirmed', 0)}   "
        f"unconfirmed {deliveries.get('unconfirmed', 0)}"
    )
    for name, key in (("mpps steps", "mpps_steps"), ("storage commitments", "storage_commitments")):
        counted = report[key]
        text = "   ".join(f"{state} {n}" for state, n in counted.items())
        lines.append(f"  {name}: {text if any(counted.values()) else 'none'}")
    if waiting:
        shown = len(report["retrying"])
        lines.append(f"  waiting for retry ({waiting}; the {shown} soonest):")
        for job in report["retrying"]:
            where = f" to {job['destination']}" if job["destination"] else ""
            lines.append(
                f"    job {job['id']} {job['kind']}{where}: attempt "
                f"{job['attempts']}/{job['max_attempts']} failed; next try "
                f"{job['next_attempt']} (in {max(0, job['next_attempt_in_s'])} s): "
                f"{job['last_error']}"
            )
    if report["dead_letters"]:
        lines.append(f"  dead letters ({len(report['dead_letters'])} shown):")
        for dead in report["dead_letters"]:
            lines.append(f"    job {dead['id']} {dead['kind']}: {dead['last_error']}")
    lines.append(f"  spool {report['spool_dir']}: {_human_bytes(report['spool_free_bytes'])} free")
    for dest in report["destinations"]:
        lines.append(
            f"  destination {dest['name']} "
            f"{dest['ae_title'] + '@' if dest.get('ae_title') else ''}{dest['address']}: "
            f"{dest.get('echo', 'not checked')}"
        )
    return "\n".join(lines)


def list_jobs(
    settings: Settings, *, state: str | None, kind: str | None, limit: int
) -> list[dict[str, Any]]:
    """The newest jobs, filtered."""
    engine = _engine(settings)
    try:
        stmt = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            stmt = stmt.where(Job.state == state)
        if kind:
            stmt = stmt.where(Job.kind == kind)
        with engine.connect() as conn:
            return [_job_row(j) for j in conn.execute(stmt).all()]
    finally:
        engine.dispose()


def render_jobs(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return "no jobs"
    lines = [f"{'ID':>6}  {'KIND':<9} {'STATE':<9} {'TRIES':>5}  {'RUN AFTER':<25} KEY"]
    for j in jobs:
        lines.append(
            f"{j['id']:>6}  {j['kind']:<9} {j['state']:<9} "
            f"{j['attempts']:>2}/{j['max_attempts']:<2}  {j['run_after'] or '':<25} {j['key']}"
        )
    return "\n".join(lines)


def show_job(settings: Settings, job_id: int) -> dict[str, Any] | None:
    """One job with the results it produced and the dispatches of its study."""
    engine = _engine(settings)
    try:
        with engine.connect() as conn:
            return job_detail(conn, job_id)
    finally:
        engine.dispose()


def job_detail(conn: Connection, job_id: int) -> dict[str, Any] | None:
    """`jobs show` as plain data (the console's job page reads it too): the job, its
    results, why its study version closed and its study's reports, or for a commitment
    report the modality's request; None when there is no such job."""
    job = conn.execute(select(Job).where(Job.id == job_id)).one_or_none()
    if job is None:
        return None
    out = _job_row(job)
    results = conn.execute(select(Result).where(Result.job_id == job_id).order_by(Result.id)).all()
    out["results"] = [
        {
            "series_uid": r.series_uid,
            "model": r.model_name,
            "model_version": r.model_version,
            "weights_sha256": r.weights_sha256,
            "level": r.level,
            "sop_instance_uid": r.sop_instance_uid,
            "frame_number": r.frame_number,
            "label": r.label,
            "probability": r.probability,
            "error": r.error,
        }
        for r in results
    ]
    if job.study_id is not None:
        study = conn.execute(select(Study).where(Study.id == job.study_id)).one()
        out["study_uid"] = study.study_uid
        out.update(_closed(conn, job.study_id, job.payload.get("study_version")))
        out["reports"] = _study_reports(conn, job.study_id)
    if job.kind == COMMITMENT_REPORT:
        out["commitment"] = _commitment(conn, int(job.payload["request_id"]))
    return out


def _commitment(conn: Connection, request_id: int) -> dict[str, Any] | None:
    """The Storage Commitment request a report job answers: who asked, for what, and how."""
    row = commitments.load(conn, request_id)
    if row is None:
        return None
    return {
        "transaction_uid": row.transaction_uid,
        "calling_ae": row.calling_ae,
        "state": row.state,
        "requested": len(row.requested),
        "committed": None if row.committed is None else len(row.committed),
        "failed": None if row.failed is None else len(row.failed),
        "received_at": _iso(row.received_at),
        "reported_at": _iso(row.reported_at),
        "last_status": row.last_status,
    }


def _closed(conn: Connection, study_id: int, version: Any) -> dict[str, Any]:
    """Why the job's study version closed (mpps, evidence, quiet, sweep, replay), if it did."""
    if version is None:
        return {}
    row = conn.execute(
        select(ClosedVersion).where(
            ClosedVersion.study_id == study_id, ClosedVersion.version == int(version)
        )
    ).one_or_none()
    if row is None:
        return {}
    return {
        "closed_by": row.reason,
        "closed_at": _iso(row.closed_at),
        "closed_detail": row.detail,
    }


def _study_reports(conn: Connection, study_id: int) -> list[dict[str, Any]]:
    """Every report of the study (SR or heatmap, where its file is) and its deliveries."""
    reports = conn.execute(
        select(
            Report.id,
            Report.kind,
            Report.sop_instance_uid,
            Report.study_version,
            Report.path,
            Report.created_at,
        )
        .where(Report.study_id == study_id)
        .order_by(Report.id)
    ).all()
    dispatches = conn.execute(
        select(
            Dispatch.report_id,
            Dispatch.id,
            Dispatch.destination,
            Dispatch.state,
            Dispatch.attempts,
            Dispatch.last_status,
            Dispatch.sent_at,
        )
        .where(Dispatch.report_id.in_([r.id for r in reports]))
        .order_by(Dispatch.id)
    ).all()
    return [
        {
            "kind": REPORT_KIND_NAMES.get(r.kind, r.kind),
            "sop_instance_uid": r.sop_instance_uid,
            "study_version": r.study_version,
            "path": r.path,
            "created_at": _iso(r.created_at),
            "deliveries": [
                {
                    "dispatch": d.id,
                    "destination": d.destination,
                    "state": d.state,
                    "attempts": d.attempts,
                    "last_status": d.last_status,
                    "sent_at": _iso(d.sent_at),
                }
                for d in dispatches
                if d.report_id == r.id
            ],
        }
        for r in reports
    ]


def render_job_detail(job: dict[str, Any]) -> str:
    lines = [f"{k}: {v}" for k, v in job.items() if k not in ("results", "reports", "commitment")]
    if job.get("commitment"):
        c = job["commitment"]
        decided = (
            "not decided yet"
            if c["committed"] is None
            else f"{c['committed']} committed, {c['failed']} failed"
        )
        lines.append(
            f"  commitment {c['transaction_uid']} from {c['calling_ae']}: {c['state']}, "
            f"{c['requested']} instance(s) requested, {decided}"
        )
    for r in job.get("results", []):
        where = r["sop_instance_uid"] or r["series_uid"]
        value = r["error"] or f"{r['label']} {r['probability']:.4f}"
        lines.append(f"  result {r['model']} {r['level']} {where}: {value}")
    for rep in job.get("reports", []):
        lines.append(
            f"  report {rep['kind']} {rep['sop_instance_uid']} v{rep['study_version']} "
            f"{rep['path']}"
        )
        for d in rep["deliveries"]:
            status = f": {d['last_status']}" if d["last_status"] else ""
            lines.append(
                f"    -> {d['destination']}: {d['state']} after {d['attempts']} attempt(s){status}"
            )
        if not rep["deliveries"]:
            lines.append("    -> no destination (see `pacs-ai reports send`)")
    return "\n".join(lines)


def _audit_operator(conn: Connection, event: str, job_id: int, by: str | None) -> None:
    """Audit an operator's decision on a job: its id, kind and study (and who, when known)."""
    row = conn.execute(
        select(Job.kind, Study.study_uid)
        .join(Study, Study.id == Job.study_id, isouter=True)
        .where(Job.id == job_id)
    ).one()
    who = {"by": by} if by else {}
    audit.record(conn, event, study_uid=row.study_uid, job=job_id, kind=row.kind, **who)


@dataclasses.dataclass(frozen=True)
class _Follows:
    """Where an operator's decision on a job moves the row the job works for: its outbox
    row (a dispatch), or the modality's Storage Commitment request (a commitment report):
    (from these states, to that one)."""

    dispatch: tuple[tuple[DispatchState, ...], DispatchState]
    commitment: tuple[tuple[CommitmentState, ...], CommitmentState]


RETRY_FOLLOWS = _Follows(
    dispatch=((DispatchState.DEAD, DispatchState.CANCELLED), DispatchState.PENDING),
    commitment=((CommitmentState.DEAD, CommitmentState.CANCELLED), CommitmentState.PENDING),
)
CANCEL_FOLLOWS = _Follows(
    dispatch=((DispatchState.PENDING,), DispatchState.CANCELLED),
    commitment=((CommitmentState.PENDING,), CommitmentState.CANCELLED),
)


def _follow(conn: Connection, job_id: int, follows: _Follows) -> None:
    """Move the row the job works for as `follows` says (in the caller's transaction)."""
    job = conn.execute(select(Job.kind, Job.payload).where(Job.id == job_id)).one()
    payload = job.payload or {}
    if payload.get("dispatch_id") is not None:
        states, to = follows.dispatch
        conn.execute(
            update(Dispatch)
            .where(Dispatch.id == payload["dispatch_id"], Dispatch.state.in_(states))
            .values(state=to, updated_at=utcnow())
        )
    if job.kind == COMMITMENT_REPORT:
        states, to = follows.commitment
        conn.execute(
            update(CommitmentRequest)
            .where(
                CommitmentRequest.id == payload["request_id"], CommitmentRequest.state.in_(states)
            )
            .values(state=to)
        )


def _operator_action(
    settings: Settings,
    job_id: int,
    action: Callable[[Engine, int], bool],
    follows: _Follows,
    event: str,
    by: str | None,
) -> bool:
    """Apply an operator's queue action; the row the job works for follows and the act is
    audited."""
    engine = _engine(settings)
    try:
        if not action(engine, job_id):
            return False
        with engine.begin() as conn:
            _follow(conn, job_id, follows)
            _audit_operator(conn, event, job_id, by)
        return True
    finally:
        engine.dispose()


def operator_retry(settings: Settings, job_id: int, by: str | None = None) -> bool:
    """Revive a dead or cancelled job; its dispatch row or commitment request comes back
    to pending with it.

    `by` names who asked (the console's user), recorded in the audit event.
    """
    return _operator_action(settings, job_id, queue.retry, RETRY_FOLLOWS, audit.JOB_RETRIED, by)


def operator_cancel(settings: Settings, job_id: int, by: str | None = None) -> bool:
    """Cancel a job; its pending dispatch row or commitment request is marked cancelled
    (`by`: as for retry)."""
    return _operator_action(settings, job_id, queue.cancel, CANCEL_FOLLOWS, audit.JOB_CANCELLED, by)
