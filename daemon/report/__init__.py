"""Results as DICOM: the Structured Report builders (on highdicom) and their UIDs."""

from daemon.report.files import write_dataset
from daemon.report.inputs import CodeSpec, DeviceInfo, Evidence, Finding, SeriesFailure, model_key
from daemon.report.sr import build_no_applicable_model_sr, build_sr
from daemon.report.uids import hashed_uid, model_device_uid, series_uid, sr_uid

__all__ = [
    "CodeSpec",
    "DeviceInfo",
    "Evidence",
    "Finding",
    "SeriesFailure",
    "build_no_applicable_model_sr",
    "build_sr",
    "hashed_uid",
    "model_device_uid",
    "model_key",
    "series_uid",
    "sr_uid",
    "write_dataset",
]
