"""Minimal DICOM files for the dispatch tests: enough for a C-STORE, nothing more."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid


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
