"""A real Orthanc sends a study to pacs-ai and asks for Storage Commitment (Orthanc is the
modality here, pacs-ai the SCP): Orthanc's own REST API shows the outcome. On SQLite and
PostgreSQL (the `engine` fixture)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select

from daemon.config import Settings
from daemon.db.schema import Instance
from daemon.dicom.status import NO_SUCH_OBJECT_INSTANCE
from daemon.receive import Receiver
from models.phantom import write_series
from tests.peers import Modality, Orthanc, free_port, require_orthanc

OUR_AE = "PACSAI"
OUTCOME_TIMEOUT_S = 20.0


@pytest.fixture
def receiver_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(receiver_port: int) -> Iterator[Orthanc]:
    """An Orthanc that knows pacs-ai as the modality `peer0`."""
    require_orthanc()
    with Orthanc(modalities=[Modality(OUR_AE, "127.0.0.1", receiver_port)]) as pacs:
        yield pacs


@pytest.fixture
def receiver(
    engine: Engine, orthanc: Orthanc, receiver_port: int, tmp_path: Path
) -> Iterator[None]:
    """pacs-ai's receiver, with Orthanc among its [[sources]]."""
    settings = Settings(
        dicom={"ae_title": OUR_AE, "bind": "127.0.0.1", "port": receiver_port},
        storage={"spool_dir": str(tmp_path / "spool"), "min_free_mb": 1},
        sources=[
            {
                "name": "orthanc",
                "ae_title": orthanc.aet,
                "host": orthanc.host,
                "port": orthanc.dicom_port,
            }
        ],
    )
    running = Receiver(settings, engine)
    running.start()
    yield
    running.stop(1.0)


def upload(orthanc: Orthanc, tmp_path: Path, slices: int) -> tuple[str, list[Any]]:
    """A phantom study in Orthanc; (its Orthanc study ID, the datasets)."""
    study_uid = generate_uid()
    paths = write_series(
        tmp_path / "study",
        slices=slices,
        rows=16,
        cols=16,
        study_uid=study_uid,
        series_uid=generate_uid(),
    )
    for path in paths:
        request = urllib.request.Request(
            f"{orthanc.url}/instances", data=path.read_bytes(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            study_id = json.loads(response.read())["ParentStudy"]
    return study_id, [dcmread(p, stop_before_pixels=True) for p in paths]


def outcome(orthanc: Orthanc, transaction: str) -> dict[str, Any]:
    """Orthanc's record of the commitment once it is no longer pending."""
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    while time.monotonic() < deadline:
        report = orthanc.rest(f"/storage-commitment/{transaction}")
        if report["Status"] != "Pending":
            return dict(report)
        time.sleep(0.1)
    raise AssertionError(f"Orthanc's commitment {transaction} still pending")


def test_orthanc_hears_success_then_failure_for_an_instance_gone_from_the_spool(
    orthanc: Orthanc, receiver: None, engine: Engine, tmp_path: Path
) -> None:
    study_id, datasets = upload(orthanc, tmp_path, slices=3)
    sent = orthanc.rest(
        "/modalities/peer0/store",
        {"Resources": [study_id], "StorageCommitment": True, "Synchronous": True},
    )
    first = outcome(orthanc, sent["StorageCommitmentTransactionUID"])
    assert first["Status"] == "Success"
    assert sorted(i["SOPInstanceUID"] for i in first["Success"]) == sorted(
        str(ds.SOPInstanceUID) for ds in datasets
    )
    lost = str(datasets[1].SOPInstanceUID)
    with engine.connect() as conn:
        path = conn.execute(
            select(Instance.path).where(Instance.sop_instance_uid == lost)
        ).scalar_one()
    Path(path).unlink()
    asked = orthanc.rest(
        "/modalities/peer0/storage-commitment",
        {"DicomInstances": [[str(ds.SOPClassUID), str(ds.SOPInstanceUID)] for ds in datasets]},
    )
    second = outcome(orthanc, asked["ID"])
    assert second["Status"] == "Failure"
    assert [(f["SOPInstanceUID"], f["FailureReason"]) for f in second["Failures"]] == [
        (lost, NO_SUCH_OBJECT_INSTANCE)
    ]
    assert len(second["Success"]) == 2
