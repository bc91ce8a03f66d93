"""Service-level fixtures: the interop suite's models and daemons, and one day of traffic.

`served_day` runs `pacs-ai serve` once for the metrics, status and log tests: a study goes
through to a real Orthanc, a sender calls the wrong AE title, and a bad instance is
quarantined. Each test then reads the service from one side (/metrics, `pacs-ai status`,
the log) and asserts what an operator would see there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import free_port
from tests.daemon_proc import Daemon, storescu, wait_for
from tests.interop.conftest import daemon_config, database_url, demo_models, make_daemon
from tests.peers import Modality, Orthanc, require_dcmtk, require_orthanc

__all__ = ["database_url", "demo_models", "make_daemon", "served_day"]

# Distinctive enough that finding them anywhere in a log can only mean a leak.
PATIENT_ID = "ZQX-PID-48151623"
BAD_PATIENT_ID = "ZQX-BAD-42424242"
WRONG_CALLED_AE = "NOT-PACSAI"
BAD_SENDER_AE = "BADSENDER"


@dataclasses.dataclass(frozen=True)
class ServedDay:
    """What happened, for the tests to compare the service's own account against."""

    daemon: Daemon
    orthanc: Orthanc
    files: list[Path]
    study_uid: str
    patient_id: str
    patient_name: str
    bad_patient_id: str
    metrics_port: int
    wrong_ae_output: str


def _refused_instance(template: Path, out: Path) -> pydicom.Dataset:
    """A CT instance without its Study Instance UID: refused and quarantined on arrival."""
    ds = pydicom.dcmread(template)
    ds.PatientID = BAD_PATIENT_ID
    ds.PatientName = f"BAD^{BAD_PATIENT_ID}"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    del ds.StudyInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return ds


def _send_with_pynetdicom(port: int, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title=BAD_SENDER_AE)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


@pytest.fixture(scope="package")
def served_day(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[ServedDay]:
    require_dcmtk()
    require_orthanc()
    from models.phantom import write_series

    workdir = tmp_path_factory.mktemp("served-day")
    metrics_port = free_port()
    config = daemon_config(
        workdir,
        demo_models,
        database_url=f"sqlite:///{workdir / 'pacs-ai.db'}",
        metrics={"port": metrics_port},
        dicom={"drain_seconds": 5, "acse_timeout": 5},
    )
    with Orthanc(modalities=[Modality("PACSAI", "127.0.0.1", config["dicom"]["port"])]) as pacs:
        config["destinations"] = [
            {"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        ]
        daemon_dir = workdir / "daemon"
        daemon_dir.mkdir()
        daemon = Daemon(daemon_dir, config)
        with daemon:
            files = write_series(
                workdir / "study",
                slices=6,
                rows=48,
                cols=48,
                lesion=True,
                seed=7,
                patient_id=PATIENT_ID,
            )
            wrong = storescu(daemon.port, files[:1], aec=WRONG_CALLED_AE)
            assert wrong.returncode != 0, "an association to the wrong AE title must fail"
            bad = _refused_instance(files[0], workdir / "refused.dcm")
            assert _send_with_pynetdicom(daemon.port, bad) != 0x0000
            sent = storescu(daemon.port, files)
            assert sent.returncode == 0, sent.stderr
            study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            wait_for(lambda: pacs.find_sr(study_uid), 180, "the SR in Orthanc")

            def all_delivered() -> bool:
                status = daemon.cli_json("status", "--no-echo")
                return (
                    set(status["dispatches"]) == {"sent"}
                    and {"analyse", "report", "dispatch"} <= set(status["jobs"])
                    and all(set(states) == {"done"} for states in status["jobs"].values())
                )

            # The SR, and any other object the report made (e.g. heatmaps), sent and done.
            wait_for(all_delivered, 60, "every dispatch recorded as sent")
            yield ServedDay(
                daemon=daemon,
                orthanc=pacs,
                files=files,
                study_uid=study_uid,
                patient_id=PATIENT_ID,
                patient_name=f"DEMO^{PATIENT_ID}",
                bad_patient_id=BAD_PATIENT_ID,
                metrics_port=metrics_port,
                wrong_ae_output=wrong.stdout + wrong.stderr,
            )
