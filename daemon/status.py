"""What an operator asks of a running installation: counts, ages, dead letters, one job."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from daemon import __version__
from daemon.config import DicomWebDestination, Settings
from daemon.db import audit, migrate, queue
from daemon.db.deliveries import CONFIRMED, SENT, VERIFY_NONE
from daemon.db.engine import make_engine
from daemon.db.schema import Dispatch, Instance, Job, Report, Result, Study, utcnow


def _engine(settings: Settings) -> Engine:
    return make_engine(settings.storage.effective_database_url, pool_size=1)


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


def _database_status(conn: Connection) -> dict[str, Any]:
    def count(col: Any, *where: Any) -> int:
        return int(conn.execute(select(func.count(col)).where(*where)).scalar_one())

    dispatches = dict(
        conn.execute(select(Dispatch.state, func.count()).group_by(Dispatch.state)).all()
    )
    return {
        "studies": count(Study.id),
        "instances": count(Instance.id, Instance.superseded_at.is_(None)),
        "reports": count(Report.id),
        "jobs": queue.counts_by_kind_and_state(conn),
        "oldest_queued_age_s": queue.oldest_queued_age(conn),
        "dispatches": {k: int(v) for k, v in dispatches.items()},
        "last_instance_received": _iso(
            conn.execute(select(func.max(Instance.received_at))).scalar_one()
        ),
        "last_sr_delivered": _iso(conn.execute(select(func.max(Dispatch.sent_at))).scalar_one()),
        "dead_letters": [
            {"id": j.id, "kind": j.kind, "key": j.key, "last_error": j.last_error}
            for j in dead_letters(conn, 10)
        ],
    }


def dead_letters(conn: Connection, limit: int, offset: int = 0) -> list[Any]:
    """Dead jobs, the most recently failed first (they wait for an operator)."""
    return list(
        conn.execute(
            select(Job)
            .where(Job.state == "dead")
            .order_by(Job.updated_at.desc(), Job.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
    )


def _delivery_counts(conn: Connection, settings: Settings) -> dict[str, int]:
    """Confirmed reports, and sent ones a verifying destination has not confirmed yet."""
    verifying = [d.name for d in settings.destinations if d.verify != VERIFY_NONE]
    confirmed = conn.execute(
        select(func.count(Dispatch.id)).where(Dispatch.state == CONFIRMED)
    ).scalar_one()
    unconfirmed = conn.execute(
        select(func.count(Dispatch.id)).where(
            Dispatch.state == SENT, Dispatch.destination.in_(verifying)
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
            "schema_at_head": revision == migrate.head_revision(),
        }
        if revision is not None:
            with engine.connect() as conn:
                report.update(_database_status(conn))
                report["deliveries"] = _delivery_counts(conn, settings)
        recorder = engine if report["schema_at_head"] else None
        report["destinations"] = [
            _destination(settings, dest, echo, recorder) for dest in settings.destinations
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
    if not report.get("schema_at_head"):
        lines.append(
            f"  schema: {report.get('schema_revision') or 'empty'} (run `pacs-ai db upgrade`)"
        )
    if "studies" in report:
        lines.append(
            f"  studies {report['studies']}   instances {report['instances']}   "
            f"reports {report['reports']}"
        )
        age = report["oldest_queued_age_s"]
        lines.append(
            f"  oldest queued job: {'none' if age is None else f'{age:.0f} s'}   "
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
            job = conn.execute(select(Job).where(Job.id == job_id)).one_or_none()
            if job is None:
                return None
            out = _job_row(job)
            results = conn.execute(
                select(Result).where(Result.job_id == job_id).order_by(Result.id)
            ).all()
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
                rows = conn.execute(
                    select(
                        Report.sop_instance_uid,
                        Report.study_version,
                        Dispatch.destination,
                        Dispatch.state.label("dispatch_state"),
                        Dispatch.last_status,
                    )
                    .join(Dispatch, Dispatch.report_id == Report.id, isouter=True)
                    .where(Report.study_id == job.study_id)
                    .order_by(Report.id)
                ).all()
                out["reports"] = [dict(row._mapping) for row in rows]
            return out
    finally:
        engine.dispose()


def render_job_detail(job: dict[str, Any]) -> str:
    lines = [f"{k}: {v}" for k, v in job.items() if k not in ("results", "reports")]
    for r in job.get("results", []):
        where = r["sop_instance_uid"] or r["series_uid"]
        value = r["error"] or f"{r['label']} {r['probability']:.4f}"
        lines.append(f"  result {r['model']} {r['level']} {where}: {value}")
    for rep in job.get("reports", []):
        lines.append(
            f"  report {rep['sop_instance_uid']} v{rep['study_version']} -> "
            f"{rep['destination']}: {rep['dispatch_state']} {rep['last_status'] or ''}"
        )
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


def _operator_action(
    settings: Settings,
    job_id: int,
    action: Callable[[Engine, int], bool],
    dispatch_from: tuple[str, ...],
    dispatch_to: str,
    event: str,
    by: str | None,
) -> bool:
    """Apply an operator's queue action; the job's outbox row follows and the act is audited."""
    engine = _engine(settings)
    try:
        if not action(engine, job_id):
            return False
        with engine.begin() as conn:
            payload = conn.execute(select(Job.payload).where(Job.id == job_id)).scalar_one()
            dispatch_id = (payload or {}).get("dispatch_id")
            if dispatch_id is not None:
                conn.execute(
                    update(Dispatch)
                    .where(Dispatch.id == dispatch_id, Dispatch.state.in_(dispatch_from))
                    .values(state=dispatch_to, updated_at=utcnow())
                )
            _audit_operator(conn, event, job_id, by)
        return True
    finally:
        engine.dispose()


def operator_retry(settings: Settings, job_id: int, by: str | None = None) -> bool:
    """Revive a dead job; a dead dispatch row comes back to pending with it.

    `by` names who asked (the console's user), recorded in the audit event.
    """
    return _operator_action(
        settings, job_id, queue.retry, ("dead", "cancelled"), "pending", audit.JOB_RETRIED, by
    )


def operator_cancel(settings: Settings, job_id: int, by: str | None = None) -> bool:
    """Cancel a job; its dispatch row, if any, is marked cancelled (`by`: as for retry)."""
    return _operator_action(
        settings, job_id, queue.cancel, ("pending",), "cancelled", audit.JOB_CANCELLED, by
    )
