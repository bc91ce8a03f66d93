"""Results as DICOM: the Structured Report and heatmap builders (on highdicom), their UIDs."""

from daemon.report.files import write_dataset
from daemon.report.heatmap import (
    HEATMAP_SOP_CLASS,
    build_heatmap_sc,
    heatmap_evidence,
    heatmap_series_uid,
    heatmap_uid,
)
from daemon.report.inputs import CodeSpec, DeviceInfo, Evidence, Finding, SeriesFailure, model_key
from daemon.report.sr import build_no_applicable_model_sr, build_sr
from daemon.report.uids import hashed_uid, model_device_uid, series_uid, sr_uid

__all__ = [
    "HEATMAP_SOP_CLASS",
    "CodeSpec",
    "DeviceInfo",
    "Evidence",
    "Finding",
    "SeriesFailure",
    "build_heatmap_sc",
    "build_no_applicable_model_sr",
    "build_sr",
    "hashed_uid",
    "heatmap_evidence",
    "heatmap_series_uid",
    "heatmap_uid",
    "model_device_uid",
    "model_key",
    "series_uid",
    "sr_uid",
    "write_dataset",
]
