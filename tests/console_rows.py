"""Studies at every stage, written straight into the tables (and real SR/heatmap files):
the console tests' data and, at 10,000 studies and 1,000,000 instances, the page benchmark's.

Study `i` of `n` (oldest first, spread over `days`) is, by `i % 100`: 0 failed (its
dispatch dead), 1 analysing, 2 reported (its dispatch retrying), 3 waiting (open version),
4..49 delivered, 50..99 verified. Each closed version records why it closed, by `i % 5`
(CLOSINGS: quiet, mpps, evidence, sweep, replay). Every tenth closed study has two
heatmaps. The audit chain holds each study's receipt and delivery, correctly linked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import Engine, Table, insert, select, text

from daemon.db import audit
from daemon.db.schema import (
    AuditEvent,
    ClosedVersion,
    CloseReason,
    Dispatch,
    Instance,
    Job,
    Report,
    Result,
    Series,
    Study,
    utcnow,
)
from daemon.report.completion import Completion
from daemon.report.heatmap import build_heatmap_sc
from daemon.report.sr import build_sr
from daemon.report.uids import series_uid, sr_uid
from tests.unit.report.studies import DEVICE, NODULE, ct_series, image_finding, series_finding

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
AES = ("CT_ROOM3", "MR_EAST", "US_ER", "CR_WARD", "PACSGW")
MODALITIES = ("CT", "MR", "US", "CR", "DX")
DESTINATION = "pacs"
CHUNK = 20000
CODES = {"normal": ["99PACSAI", "NORMAL", "Normal"], "lesion": ["99PACSAI", "LES", "Lesion"]}
CLOSINGS = (
    CloseReason.QUIET,
    CloseReason.MPPS,
    CloseReason.EVIDENCE,
    CloseReason.SWEEP,
    CloseReason.REPLAY,
)


@dataclasses.dataclass(frozen=True)
class Documents:
    """One real instance, SR and heatmap file every filled row points at."""

    instance: Path
    sr: Path
    heatmap: Path


def write_documents(
    directory: Path, *, slices: int = 1, size: int = 64, completion: Completion = Completion()
) -> Documents:
    """A CT instance (pydicom's CT_small); an SR of an image finding (and, with several
    `slices`, a series finding over all of them, as an LSTM's) saying what `completion`
    says of the procedure; a `size`-pixel heatmap."""
    directory.mkdir(parents=True, exist_ok=True)
    instance = directory / "instance.dcm"
    shutil.copyfile(str(get_testdata_file("CT_small.dcm")), instance)
    sources = ct_series(slices)
    for source in sources:
        source.Rows = source.Columns = size
    ramp = np.linspace(0, 255, size * size * 3).reshape(size, size, 3).astype(np.uint8)
    capture = build_heatmap_sc(
        sources[0],
        ramp,
        model_name="chest-cnn",
        model_version="1.2.0",
        weights_sha256="ab" * 32,
        finding=NODULE,
        study_version=1,
        clinical_use=False,
        device=DEVICE,
        series_number=7702,
        instance_number=1,
    )
    heatmap = directory / "heatmap.dcm"
    capture.save_as(heatmap, enforce_file_format=True)
    findings = [dataclasses.replace(image_finding(sources[0]), heatmaps=())]
    if slices > 1:
        findings.append(series_finding(sources))
    uid = str(sources[0].StudyInstanceUID)
    sr = build_sr(
        sources,
        findings,
        sop_instance_uid=sr_uid(uid, 1, [f.model_key for f in findings]),
        series_instance_uid=series_uid(uid),
        series_number=7701,
        instance_number=1,
        device=DEVICE,
        completion=completion,
    )
    sr_path = directory / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    return Documents(instance, sr_path, heatmap)


def stage_of_index(i: int) -> str:
    """What study `i` is filled as (see the module's docstring)."""
    return {0: "failed", 1: "analysing", 2: "reported", 3: "waiting"}.get(
        i % 100, "delivered" if i % 100 < 50 else "verified"
    )


@dataclasses.dataclass
class _Rows:
    studies: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    series: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    instances: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    closed: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    jobs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    reports: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    dispatches: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Filled:
    study_uids: list[str]
    stages: dict[str, str]  # study UID -> what it was filled as


# The tables filled here, each with explicit ids.
TABLES = (
    "studies",
    "series",
    "instances",
    "closed_versions",
    "jobs",
    "results",
    "reports",
    "dispatches",
    "audit",
)


class _Ids:
    """Explicit ids, after those the tables hold already."""

    def __init__(self, engine: Engine) -> None:
        with engine.connect() as conn:
            self.next = {
                t: int(conn.execute(text(f"SELECT COALESCE(max(id), 0) FROM {t}")).scalar_one())
                for t in TABLES
            }

    def __call__(self, table: str) -> int:
        self.next[table] = self.next.get(table, 0) + 1
        return self.next[table]


def _job(
    ids: _Ids,
    kind: str,
    key: str,
    study_id: int,
    state: str,
    at: dt.datetime,
    payload: dict[str, Any],
    error: str | None = None,
) -> dict[str, Any]:
    return {
        "id": ids("jobs"),
        "kind": kind,
        "key": key,
        "study_id": study_id,
        "payload": payload,
        "state": state,
        "attempts": 1 if state != "queued" else 3,
        "max_attempts": 5,
        "run_after": at,
        "lease_owner": "bench:1:w" if state == "running" else None,
        "lease_expires_at": at + dt.timedelta(minutes=2) if state == "running" else None,
        "last_error": error,
        "created_at": at,
        "updated_at": at + dt.timedelta(seconds=2),
        "finished_at": at + dt.timedelta(seconds=2) if state in ("done", "dead") else None,
    }


def _study_rows(
    rows: _Rows, ids: _Ids, i: int, uid: str, last: dt.datetime, per_study: int, docs: Documents
) -> str:
    stage = stage_of_index(i)
    study_id = ids("studies")
    first = last - dt.timedelta(seconds=per_study * 0.5)
    closed = stage != "waiting"
    rows.studies.append(
        {
            "id": study_id,
            "study_uid": uid,
            "version": 2 if closed else 1,
            "first_received_at": first,
            "last_received_at": last,
        }
    )
    series_id = ids("series")
    s_uid = f"{uid}.1"
    rows.series.append(
        {
            "id": series_id,
            "study_id": study_id,
            "series_uid": s_uid,
            "modality": MODALITIES[i % len(MODALITIES)],
            "body_part": "CHEST",
        }
    )
    ae = AES[i % len(AES)]
    for k in range(per_study):
        rows.instances.append(
            {
                "id": ids("instances"),
                "study_id": study_id,
                "series_id": series_id,
                "sop_instance_uid": f"{uid}.1.{k}",
                "sop_class_uid": CT,
                "transfer_syntax_uid": EXPLICIT_LE,
                "study_version": 1,
                "path": str(docs.instance),
                "size": 1000,
                "sha256": f"{i:032x}{k:032x}",
                "calling_ae": ae,
                "received_at": first + dt.timedelta(seconds=k * 0.5),
                "superseded_at": None,
                "deleted_at": None,
            }
        )
    if not closed:
        return stage
    rows.closed.append(_closed_version(ids, i, study_id, s_uid, last))
    payload = {"study_uid": uid, "study_version": 1}
    analyse = _job(
        ids,
        "analyse",
        f"analyse:{uid}:v1",
        study_id,
        "running" if stage == "analysing" else "done",
        last,
        payload,
    )
    rows.jobs.append(analyse)
    if stage == "analysing":
        return stage
    # Each of (up to) ten images scored alike for both labels, then the series (sop None).
    scored: list[tuple[str | None, dict[str, float]]] = [
        (f"{uid}.1.{k}", dict.fromkeys(CODES, (k * 37 % 100) / 100))
        for k in range(min(per_study, 10))
    ]
    scored.append((None, {"normal": 0.7, "lesion": 0.3}))
    for sop, probabilities in scored:
        level = "series" if sop is None else "image"
        for label, p in probabilities.items():
            rows.results.append(
                _result(ids, analyse["id"], study_id, s_uid, level, sop, label, p, last)
            )
    rows.jobs.append(_job(ids, "report", f"report:{uid}:v1", study_id, "done", last, payload))
    report_id = ids("reports")
    rows.reports.append(
        {
            "id": report_id,
            "study_id": study_id,
            "study_version": 1,
            "sop_instance_uid": f"{uid}.9.1",
            "sop_class_uid": SR_CLASS,
            "kind": "sr",
            "path": str(docs.sr),
            "fallback_path": None,
            "created_at": last + dt.timedelta(seconds=3),
        }
    )
    if i % 10 == 5:
        for h in range(2):
            rows.reports.append(
                {
                    "id": ids("reports"),
                    "study_id": study_id,
                    "study_version": 1,
                    "sop_instance_uid": f"{uid}.8.{h}",
                    "sop_class_uid": SC_CLASS,
                    "kind": "heatmap",
                    "path": str(docs.heatmap),
                    "fallback_path": None,
                    "created_at": last + dt.timedelta(seconds=3),
                }
            )
    sent = last + dt.timedelta(seconds=4)
    state = {"failed": "dead", "reported": "pending", "delivered": "sent"}.get(stage, "confirmed")
    dispatch_id = ids("dispatches")
    rows.dispatches.append(
        {
            "id": dispatch_id,
            "report_id": report_id,
            "destination": DESTINATION,
            "state": state,
            "attempts": 1,
            "last_status": "0xA700 out of resources" if stage == "failed" else None,
            "sent_sop_class_uid": None,
            "sent_at": sent if state in ("sent", "confirmed") else None,
            "transaction_uid": None,
            "verify_attempts": 0,
            "confirmed_at": sent if state == "confirmed" else None,
            "created_at": last,
            "updated_at": sent,
        }
    )
    job_state = {"dead": "dead", "pending": "queued"}.get(state, "done")
    error = "association refused: PACS unreachable" if job_state != "done" else None
    rows.jobs.append(
        _job(
            ids,
            "dispatch",
            f"dispatch:{dispatch_id}",
            study_id,
            job_state,
            last,
            {"dispatch_id": dispatch_id, "destination": DESTINATION},
            error,
        )
    )
    if state == "confirmed":
        rows.jobs.append(
            _job(
                ids,
                "verify",
                f"verify:{dispatch_id}:a1",
                study_id,
                "done",
                sent,
                {"dispatch_id": dispatch_id},
            )
        )
    return stage


def _closed_version(
    ids: _Ids, i: int, study_id: int, s_uid: str, at: dt.datetime
) -> dict[str, Any]:
    """Version 1 closed for CLOSINGS[i % 5], with the detail daemon.assemble records."""
    reason = CLOSINGS[i % len(CLOSINGS)]
    detail = {
        CloseReason.MPPS: {"mpps": [f"{s_uid}.77"]},
        CloseReason.EVIDENCE: {"evidence": {s_uid: "InstanceNumber 1..3, even spacing"}},
    }.get(reason, {})
    return {
        "id": ids("closed_versions"),
        "study_id": study_id,
        "version": 1,
        "reason": reason,
        "detail": detail,
        "closed_at": at,
    }


def _result(
    ids: _Ids,
    job_id: int,
    study_id: int,
    s_uid: str,
    level: str,
    sop: str | None,
    label: str,
    probability: float,
    at: dt.datetime,
) -> dict[str, Any]:
    return {
        "id": ids("results"),
        "job_id": job_id,
        "study_id": study_id,
        "study_version": 1,
        "series_uid": s_uid,
        "model_name": "demo-cnn" if level == "image" else "demo-lstm",
        "model_version": "1.0.0",
        "weights_sha256": "ab" * 32,
        "level": level,
        "sop_instance_uid": sop,
        "frame_number": None,
        "label": label,
        "probability": probability,
        "error": None,
        "created_at": at,
        "detail": {"code": CODES[label], "threshold": 0.5, "clinical_use": False, "shadow": False},
    }


def _chunks(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), CHUNK):
        yield rows[start : start + CHUNK]


def _write(engine: Engine, rows: _Rows) -> None:
    tables: list[tuple[Table, list[dict[str, Any]]]] = [
        (Study.__table__, rows.studies),
        (Series.__table__, rows.series),  # type: ignore[list-item]
        (Instance.__table__, rows.instances),
        (ClosedVersion.__table__, rows.closed),  # type: ignore[list-item]
        (Job.__table__, rows.jobs),  # type: ignore[list-item]
        (Result.__table__, rows.results),
        (Report.__table__, rows.reports),  # type: ignore[list-item]
        (Dispatch.__table__, rows.dispatches),  # type: ignore[list-item]
    ]
    for table, values in tables:
        for chunk in _chunks(values):
            with engine.begin() as conn:
                conn.execute(insert(table), chunk)


def _audit_rows(
    engine: Engine, uids: list[str], stages: dict[str, str], at: dt.datetime
) -> list[dict[str, Any]]:
    """Each study's receipt, then each delivery, linked to the chain as `audit.record` links."""
    with engine.connect() as conn:
        last = conn.execute(
            select(AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)
        ).one_or_none()
    first_id, prev = (last.id, last.hash) if last else (0, audit.GENESIS_HASH)
    out = []
    events = [(audit.STUDY_RECEIVED, uid, {}) for uid in uids] + [
        (audit.SR_DELIVERED, uid, {"destination": DESTINATION})
        for uid in uids
        if stages[uid] in ("delivered", "verified")
    ]
    for n, (event, uid, detail) in enumerate(events, start=first_id + 1):
        created = at + dt.timedelta(microseconds=n)
        digest = audit.row_hash(created, event, uid, detail, prev)
        out.append(
            {
                "id": n,
                "created_at": created,
                "event": event,
                "study_uid": uid,
                "detail": detail,
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    return out


def _advance_sequences(engine: Engine) -> None:
    """PostgreSQL: serial ids continue after the ones written here."""
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as conn:
        for table in TABLES:
            conn.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"COALESCE((SELECT max(id) FROM {table}), 1))"
                )
            )


def fill(
    engine: Engine,
    docs: Documents,
    *,
    studies: int,
    instances_per_study: int,
    days: float = 30.0,
    now: dt.datetime | None = None,
) -> Filled:
    """Write `studies` studies of `instances_per_study` instances, the newest now."""
    now = now or utcnow()
    span = dt.timedelta(days=days)
    prefix = generate_uid(prefix=None)[:40]
    ids = _Ids(engine)
    rows = _Rows()
    uids: list[str] = []
    stages: dict[str, str] = {}
    for i in range(studies):
        uid = f"{prefix}.{i}"
        last = now - span * (studies - 1 - i) / max(studies, 1)
        stages[uid] = _study_rows(rows, ids, i, uid, last, instances_per_study, docs)
        uids.append(uid)
        if len(rows.instances) >= CHUNK * 5:
            _write(engine, rows)
            rows = _Rows()
    _write(engine, rows)
    chain = _audit_rows(engine, uids, stages, now)
    for chunk in _chunks(chain):
        with engine.begin() as conn:
            conn.execute(insert(AuditEvent.__table__), chunk)  # type: ignore[arg-type]
    _advance_sequences(engine)
    return Filled(uids, stages)
