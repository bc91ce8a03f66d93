"""What the reliability tests share: the daemon's rows read from outside, its processes, checks.

The tests read the database the daemon writes with their own plain connection (no
``BEGIN IMMEDIATE`` on SQLite, so polling never takes the write lock from the daemon).
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.engine import make_url

from daemon.config import load_settings
from daemon.db.schema import Dispatch, Instance, Job, Report, Study
from daemon.spool import CACHE_DIR, QUARANTINE_DIR, REPORTS_DIR, TMP_DIR
from tests.daemon_proc import Daemon

SPOOL_SIDE_DIRS = {TMP_DIR, REPORTS_DIR, CACHE_DIR, QUARANTINE_DIR}


def daemon_database(daemon: Daemon) -> Engine:
    """A read-mostly engine on the daemon's database (its effective URL)."""
    url = make_url(load_settings(daemon.config_path).storage.effective_database_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return (
        create_engine(url, pool_size=1)
        if url.get_backend_name() != "sqlite"
        else (create_engine(url))
    )


def jobs(engine: Engine, kind: str | None = None) -> list[Any]:
    """Every job row (of one kind), oldest first."""
    stmt = select(Job).order_by(Job.id)
    if kind is not None:
        stmt = stmt.where(Job.kind == kind)
    with engine.connect() as conn:
        return list(conn.execute(stmt).all())


def running_job(engine: Engine, kind: str) -> Any | None:
    """The job of `kind` a worker holds right now, or None."""
    with engine.connect() as conn:
        return conn.execute(
            select(Job).where(Job.kind == kind, Job.state == "running").limit(1)
        ).one_or_none()


def study_uids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(Study.study_uid)).scalars())


def instance_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(Instance).order_by(Instance.id)).all())


def instance_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count(Instance.id))).scalar_one())


def reports_of(engine: Engine, study_uid: str) -> list[Any]:
    """(study_version, sop_instance_uid, path, fallback_path) of the study's SRs.

    Heatmap captures (Report rows of another kind) are not counted: they are not the SR.
    """
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(
                    Report.study_version,
                    Report.sop_instance_uid,
                    Report.path,
                    Report.fallback_path,
                )
                .join(Study, Study.id == Report.study_id)
                .where(Study.study_uid == study_uid, Report.kind == "sr")
                .order_by(Report.study_version)
            ).all()
        )


def dispatch_states(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(Dispatch.state).order_by(Dispatch.id)).scalars())


def open_instances(engine: Engine) -> int:
    """Instances of a study version not yet queued for analysis (still in its quiet window)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count(Instance.id))
                .join(Study, Study.id == Instance.study_id)
                .where(Instance.study_version == Study.version)
            ).scalar_one()
        )


def all_jobs_finished(engine: Engine) -> bool:
    """Nothing queued or running: every stage has had its say."""
    return bool(jobs(engine)) and all(
        j.state in ("done", "dead", "cancelled") for j in jobs(engine)
    )


def lease_pid(job: Any) -> int:
    """The worker process holding a job: its lease owner reads `host:pid:name`."""
    return int(str(job.lease_owner).split(":")[1])


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"process {pid} has no VmRSS")


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_spool_holds_only_committed_instances(
    spool_dir: Path, engine: Engine, *, unnamed_allowed: bool = False
) -> None:
    """Every row's file holds the row's bytes; the instance tree holds nothing partial.

    With `unnamed_allowed` (right after a crash, before the resend) a file no row names may
    remain: a crash between the rename into place and the commit leaves one, complete, that
    the resend replaces. Temporary files (``*.part``) may only be in the spool's tmp dir.
    """
    rows = instance_rows(engine)
    by_path = {os.path.realpath(r.path): r for r in rows if r.deleted_at is None}
    for row in by_path.values():
        path = Path(row.path)
        assert path.is_file(), f"row {row.id} names a missing file {path}"
        assert sha256_file(path) == row.sha256, f"{path} does not hold the bytes of its row"
        assert path.stat().st_size == row.size
        assert pydicom.dcmread(path).SOPInstanceUID == row.sop_instance_uid
    stray_parts = [p for p in spool_dir.rglob("*.part") if p.parent != spool_dir / TMP_DIR]
    assert not stray_parts, f"temporary files outside {TMP_DIR}: {stray_parts}"
    for path in instance_tree(spool_dir):
        if os.path.realpath(path) in by_path:
            continue
        assert unnamed_allowed, f"{path} is in the spool but no row names it"
        assert_complete_instance(path)


def assert_complete_instance(path: Path) -> None:
    """The file parses to its last byte and is the instance its name says."""
    ds = pydicom.dcmread(path)
    assert path.name == f"{ds.SOPInstanceUID}.dcm", path
    expected = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
    assert len(ds.PixelData) == expected, f"{path} is cut short"


def instance_tree(spool_dir: Path) -> list[Path]:
    """Every file under the spool's <study>/<series>/ folders."""
    return [
        p
        for p in spool_dir.rglob("*")
        if p.is_file()
        and p.relative_to(spool_dir).parts[0] not in SPOOL_SIDE_DIRS
        and len(p.relative_to(spool_dir).parts) == 3
    ]


def analysed_versions(engine: Engine, study_uid: str) -> list[int]:
    """Study versions whose analysis finished (each owes exactly one report)."""
    out = []
    for job in jobs(engine, "analyse"):
        if job.payload.get("study_uid") == study_uid and job.state == "done":
            out.append(int(job.payload["study_version"]))
    return sorted(out)


def assert_one_sr_per_version(engine: Engine, study_uid: str, delivered: Iterable[str]) -> None:
    """Each analysed version has one report, and the PACS holds each report's UID once.

    `delivered` lists the SOP Instance UID of every SR the PACS holds (or received) for the
    study; the main SR or its Enhanced SR twin counts, never both.
    """
    versions = analysed_versions(engine, study_uid)
    reports = reports_of(engine, study_uid)
    assert versions, "no version of the study was analysed"
    assert [r.study_version for r in reports] == versions, "one report per analysed version"
    held = list(delivered)
    assert len(held) == len(set(held)), f"the PACS holds an SR twice: {held}"
    expected = set()
    for report in reports:
        matches = {report.sop_instance_uid, enhanced_twin_uid(report)} & set(held)
        assert len(matches) == 1, f"version {report.study_version}: held {held}"
        expected |= matches
    assert set(held) == expected, f"SRs the daemon never reported: {set(held) - expected}"


def enhanced_twin_uid(report: Any) -> str:
    """The UID of the SR's Enhanced SR twin, sent instead to a PACS without Comprehensive 3D."""
    if report.fallback_path:
        return str(pydicom.dcmread(report.fallback_path).SOPInstanceUID)
    from daemon.dispatch.scu import enhanced_twin_dataset

    return str(enhanced_twin_dataset(Path(report.path)).SOPInstanceUID)
