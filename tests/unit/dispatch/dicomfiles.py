"""Minimal DICOM files for the dispatch tests: enough for a C-STORE, nothing more."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, Comprehensive3DSRStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import Engine

from daemon.db import queue
from daemon.db.keys import DISPATCH, dispatch_key
from daemon.db.schema import Dispatch, Report, Study


def write_instance(
    path: Path,
    sop_class_uid: str,
    *,
    study_uid: str | None = None,
    transfer_syntax: UID = ExplicitVRLittleEndian,
) -> str:
    """Write a minimal instance of `sop_class_uid` (enough for C-STORE); return its UID."""
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = "TEST"
    ds.PatientName = "Test^Dispatch"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def add_dispatch(
    engine: Engine,
    main: Path,
    fallback: Path,
    *,
    destination: str,
    study_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> int:
    """A study, its report, one pending outbox row and its dispatch job; the row's id."""
    with engine.begin() as conn:
        study_id = conn.execute(
            Study.__table__.insert()
            .values(study_uid=study_uid or generate_uid())
            .returning(Study.id)
        ).scalar_one()
        report_id = conn.execute(
            Report.__table__.insert()
            .values(
                study_id=study_id,
                study_version=1,
                sop_instance_uid=sop_instance_uid or generate_uid(),
                sop_class_uid=Comprehensive3DSRStorage,
                path=str(main),
                fallback_path=str(fallback),
            )
            .returning(Report.id)
        ).scalar_one()
        dispatch_id = conn.execute(
            Dispatch.__table__.insert()
            .values(report_id=report_id, destination=destination, state="pending")
            .returning(Dispatch.id)
        ).scalar_one()
        queue.enqueue(
            conn,
            DISPATCH,
            dispatch_key(dispatch_id),
            max_attempts=5,
            payload={"dispatch_id": dispatch_id, "destination": destination},
        )
    return int(dispatch_id)
