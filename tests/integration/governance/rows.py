"""Rows built straight into the database, and files in a spool, for the governance tests."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import Engine, insert, select

from daemon.config import Settings
from daemon.db.schema import Dispatch, Instance, Report, Result, Series, Study, utcnow
from daemon.spool import Spool
from tests.unit.report.studies import ct_series

CT = "1.2.840.10008.5.1.4.1.1.2"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def settings_for(url: str, spool_dir: Path, **sections: Any) -> Settings:
    """Settings on the test database and spool, plus whatever sections a test adds."""
    storage = {"spool_dir": str(spool_dir), "database_url": url, **sections.pop("storage", {})}
    return Settings(storage=storage, **sections)


def add_study(engine: Engine, study_uid: str, *, version: int = 1) -> int:
    """A study row; returns its id."""
    now = utcnow()
    with engine.begin() as conn:
        return int(
            conn.execute(
                insert(Study)
                .values(
                    study_uid=study_uid,
                    version=version,
                    first_received_at=now,
                    last_received_at=now,
                )
                .returning(Study.id)
            ).scalar_one()
        )


def add_series(engine: Engine, study_id: int, series_uid: str) -> int:
    """A series row of a study; returns its id."""
    with engine.begin() as conn:
        return int(
            conn.execute(
                insert(Series)
                .values(study_id=study_id, series_uid=series_uid, modality="CT")
                .returning(Series.id)
            ).scalar_one()
        )


def add_instance(
    engine: Engine,
    spool: Spool,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    *,
    study_version: int = 1,
    superseded: bool = False,
    data: bytes = b"DICM",
) -> Path:
    """A spooled file (its current or set-aside name) and its instances row."""
    with engine.connect() as conn:
        study_id = conn.execute(select(Study.id).where(Study.study_uid == study_uid)).scalar_one()
        series_id = conn.execute(
            select(Series.id).where(Series.series_uid == series_uid)
        ).scalar_one()
    path = spool.instance_path(study_uid, series_uid, sop_uid)
    sha = f"{len(data):064x}" if not superseded else "a" * 64
    if superseded:
        path = spool.aside_path(path, sha)
    spool.make_dirs(path.parent)
    spool.write_atomic(path, data)
    with engine.begin() as conn:
        conn.execute(
            insert(Instance).values(
                study_id=study_id,
                series_id=series_id,
                sop_instance_uid=sop_uid,
                sop_class_uid=CT,
                transfer_syntax_uid=EXPLICIT_LE,
                study_version=study_version,
                path=str(path),
                size=len(data),
                sha256=sha,
                calling_ae="SCANNER",
                received_at=utcnow(),
                superseded_at=utcnow() if superseded else None,
            )
        )
    return path


def add_report(
    engine: Engine, study_id: int, version: int, sr_uid: str, path: Path | None = None
) -> int:
    """A report row for a study version; returns its id."""
    with engine.begin() as conn:
        return int(
            conn.execute(
                insert(Report)
                .values(
                    study_id=study_id,
                    study_version=version,
                    sop_instance_uid=sr_uid,
                    sop_class_uid=COMPREHENSIVE_3D_SR,
                    path=str(path or f"/nonexistent/{sr_uid}.dcm"),
                )
                .returning(Report.id)
            ).scalar_one()
        )


def add_dispatch(
    engine: Engine,
    report_id: int,
    destination: str,
    state: str,
    *,
    at: dt.datetime | None = None,
) -> int:
    """An outbox row; `at` stamps sent_at (and confirmed_at when confirmed)."""
    at = at or utcnow()
    values: dict[str, Any] = {
        "report_id": report_id,
        "destination": destination,
        "state": state,
        "sent_at": at if state in ("sent", "confirmed") else None,
        "confirmed_at": at if state == "confirmed" else None,
    }
    with engine.begin() as conn:
        return int(
            conn.execute(insert(Dispatch).values(**values).returning(Dispatch.id)).scalar_one()
        )


def add_results(engine: Engine, job_id: int, study_id: int, rows: list[dict[str, Any]]) -> None:
    """Results rows of one analyse job (the defaults fill what a test leaves out)."""
    defaults: dict[str, Any] = {
        "job_id": job_id,
        "study_id": study_id,
        "study_version": 1,
        "model_version": "1",
        "weights_sha256": "ab" * 32,
        "sop_instance_uid": None,
        "frame_number": None,
        "error": None,
    }
    with engine.begin() as conn:
        conn.execute(insert(Result), [{**defaults, **row} for row in rows])


def add_ct_source(engine: Engine, spool: Spool, study_uid: str) -> None:
    """A study (open at version 2) with one real CT header spooled in version 1."""
    ds: Dataset = ct_series(1, study_uid=study_uid)[0]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    study_id = add_study(engine, study_uid, version=2)
    add_series(engine, study_id, str(ds.SeriesInstanceUID))
    path = add_instance(engine, spool, study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    ds.save_as(path, enforce_file_format=True)
