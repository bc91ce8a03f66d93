"""STOW-RS through dicomweb-client: the same ingest as C-STORE, answered per PS3.18 Annex I."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom.uid import generate_uid
from sqlalchemy import event

from daemon.dicom import status
from tests.unit.http.conftest import (
    STOW_TYPE,
    Face,
    StartFace,
    ct,
    encode,
    multipart,
    study,
)


def client(face: Face, role: str = "store") -> DICOMwebClient:
    return DICOMwebClient(face.dicomweb, headers=face.auth(role))


def failures(answer: dict) -> list[tuple[str | None, int]]:
    """(SOP Instance UID, Failure Reason) of each FailedSOPSequence item (DICOM JSON)."""
    items = (answer.get("00081198") or {}).get("Value", [])
    return [
        (
            (item.get("00081155") or {}).get("Value", [None])[0],
            item["00081197"]["Value"][0],
        )
        for item in items
    ]


def stored_uids(answer: dict) -> list[str]:
    items = (answer.get("00081199") or {}).get("Value", [])
    return [item["00081155"]["Value"][0] for item in items]


def test_instances_are_stored_durably_and_named_in_the_answer(face: Face) -> None:
    datasets = study(5)
    answer = client(face).store_instances(datasets)
    sent = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    assert (
        sorted(answer.ReferencedSOPSequence[i].ReferencedSOPInstanceUID for i in range(5)) == sent
    )
    assert "FailedSOPSequence" not in answer
    rows = face.rows()
    assert sorted(r.sop_instance_uid for r in rows) == sent
    for row in rows:  # acknowledged = the file under its row's path holds the row's bytes
        assert hashlib.sha256(Path(row.path).read_bytes()).hexdigest() == row.sha256
        assert row.calling_ae == "store-client"
        assert row.transfer_syntax_uid == str(datasets[0].file_meta.TransferSyntaxUID)
    assert face.stored == [str(datasets[0].StudyInstanceUID)]
    assert face.temp_files() == []


def test_a_request_of_many_instances_is_one_database_commit(face: Face) -> None:
    commits: list[int] = []

    def count(_conn: object) -> None:
        commits.append(1)

    event.listen(face.engine, "commit", count)
    try:
        client(face).store_instances(study(20))
    finally:
        event.remove(face.engine, "commit", count)
    assert len(face.rows()) == 20
    assert len(commits) == 1


def test_to_the_study_in_the_path_another_study_is_refused_and_the_rest_stored(
    face: Face,
) -> None:
    good = study(2)
    stranger = ct()
    body = multipart([encode(good[0]), encode(stranger), encode(good[1])])
    rsp = httpx.post(
        f"{face.dicomweb}/studies/{good[0].StudyInstanceUID}",
        content=body,
        headers={**face.auth(), "Content-Type": STOW_TYPE},
    )
    assert rsp.status_code == 202
    assert rsp.headers["content-type"] == "application/dicom+json"
    answer = rsp.json()
    assert failures(answer) == [(str(stranger.SOPInstanceUID), status.STUDY_MISMATCH)]
    assert sorted(stored_uids(answer)) == sorted(str(d.SOPInstanceUID) for d in good)
    assert sorted(r.sop_instance_uid for r in face.rows()) == sorted(
        str(d.SOPInstanceUID) for d in good
    )
    assert len(face.quarantined()) == 1


def test_a_part_that_is_not_dicom_is_listed_with_the_dimse_failure_reason(face: Face) -> None:
    good = ct()
    body = multipart([b"this is not a DICOM file" * 10, encode(good)])
    rsp = httpx.post(
        f"{face.dicomweb}/studies", content=body, headers={**face.auth(), "Content-Type": STOW_TYPE}
    )
    assert rsp.status_code == 202
    assert failures(rsp.json())[0][1] in (status.CANNOT_PARSE_DATASET, status.MISSING_UID)
    assert stored_uids(rsp.json()) == [str(good.SOPInstanceUID)]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_nothing_stored_is_409_with_each_reason(face: Face) -> None:
    no_study = ct()
    del no_study.StudyInstanceUID
    bad_uid = ct()
    bad_uid.SeriesInstanceUID = "1.2.3/../../etc"
    body = multipart([encode(no_study), encode(bad_uid)])
    rsp = httpx.post(
        f"{face.dicomweb}/studies", content=body, headers={**face.auth(), "Content-Type": STOW_TYPE}
    )
    assert rsp.status_code == 409
    assert [reason for _, reason in failures(rsp.json())] == [
        status.MISSING_UID,
        status.INVALID_UID,
    ]
    assert face.rows() == []
    assert face.temp_files() == []
    with pytest.raises(requests.HTTPError) as err:  # what a client library makes of it
        client(face).store_instances([no_study])
    assert err.value.response.status_code == 409


def test_a_series_of_another_study_gets_the_c_store_status(face: Face) -> None:
    first = ct()
    client(face).store_instances([first])
    thief = ct(series_uid=str(first.SeriesInstanceUID))
    rsp = httpx.post(
        f"{face.dicomweb}/studies",
        content=multipart([encode(thief)]),
        headers={**face.auth(), "Content-Type": STOW_TYPE},
    )
    assert rsp.status_code == 409
    assert failures(rsp.json()) == [(str(thief.SOPInstanceUID), status.SERIES_IN_OTHER_STUDY)]


def test_the_same_instances_sent_again_are_stored_once(face: Face) -> None:
    datasets = study(3)
    client(face).store_instances(datasets)
    answer = client(face).store_instances(datasets)
    assert len(answer.ReferencedSOPSequence) == 3
    assert len(face.rows()) == 3
    assert face.temp_files() == []


def test_changed_instance_in_one_request_keeps_both_versions(face: Face) -> None:
    original = ct()
    changed = ct(str(original.StudyInstanceUID), str(original.SeriesInstanceUID))
    changed.SOPInstanceUID = original.SOPInstanceUID
    changed.file_meta.MediaStorageSOPInstanceUID = original.SOPInstanceUID
    changed.PatientName = "Changed^Name"
    client(face).store_instances([original, changed])
    rows = face.rows()
    assert len(rows) == 2
    assert [r.superseded_at is None for r in rows] == [False, True]
    for row in rows:
        assert hashlib.sha256(Path(row.path).read_bytes()).hexdigest() == row.sha256


def test_without_room_nothing_is_written_and_the_answer_is_503_out_of_resources(
    start_face: StartFace,
) -> None:
    face = start_face(min_free_mb=1, free_bytes=lambda _path: 0)
    datasets = study(2)
    rsp = httpx.post(
        f"{face.dicomweb}/studies",
        content=multipart([encode(d) for d in datasets]),
        headers={**face.auth(), "Content-Type": STOW_TYPE},
    )
    assert rsp.status_code == 503
    assert rsp.headers["retry-after"]
    assert failures(rsp.json()) == [
        (str(d.SOPInstanceUID), status.OUT_OF_RESOURCES) for d in datasets
    ]
    assert face.rows() == []
    assert face.temp_files() == []


def test_a_large_instance_over_the_kept_head_is_read_from_its_file(face: Face) -> None:
    ds = ct()
    ds.EncapsulatedDocument = b"\0" * 100_000  # a header longer than the bytes kept in memory
    answer = client(face).store_instances([ds])
    assert len(answer.ReferencedSOPSequence) == 1
    row = face.rows()[0]
    assert hashlib.sha256(Path(row.path).read_bytes()).hexdigest() == row.sha256


def test_a_truncated_instance_is_refused(face: Face) -> None:
    data = encode(ct())
    rsp = httpx.post(
        f"{face.dicomweb}/studies",
        content=multipart([data[:-100]]),
        headers={**face.auth(), "Content-Type": STOW_TYPE},
    )
    assert rsp.status_code == 409
    assert failures(rsp.json())[0][1] == status.CANNOT_PARSE_DATASET
    assert face.rows() == []


def test_study_uid_in_the_path_must_be_a_usable_uid(face: Face) -> None:
    # Over 64 characters: refused as the C-STORE path refuses it (a merely non-conformant
    # UID, such as a de-identifier's hex digest, is stored like any other).
    rsp = httpx.post(
        f"{face.dicomweb}/studies/{'1' * 65}",
        content=multipart([encode(ct())]),
        headers={**face.auth(), "Content-Type": STOW_TYPE},
    )
    assert rsp.status_code == 400
    assert face.rows() == []


def test_a_generated_study_uid_in_the_path_is_accepted(face: Face) -> None:
    ds = ct(study_uid=generate_uid())
    answer = client(face).store_instances([ds], study_instance_uid=str(ds.StudyInstanceUID))
    assert len(answer.ReferencedSOPSequence) == 1


def test_one_series_in_two_studies_of_one_request_is_stored_in_one_of_them(face: Face) -> None:
    first = ct()
    other = ct(series_uid=str(first.SeriesInstanceUID))
    rsp = httpx.post(
        f"{face.dicomweb}/studies",
        content=multipart([encode(first), encode(other)]),
        headers={**face.auth(), "Content-Type": STOW_TYPE},
    )
    assert rsp.status_code == 202
    ((refused, reason),) = failures(rsp.json())
    assert reason == status.SERIES_IN_OTHER_STUDY
    (stored,) = stored_uids(rsp.json())
    assert {refused, stored} == {str(first.SOPInstanceUID), str(other.SOPInstanceUID)}
    assert [r.sop_instance_uid for r in face.rows()] == [stored]


def test_free_space_is_measured_once_per_request_while_it_lasts(start_face: StartFace) -> None:
    measured: list[Path] = []

    def free(path: Path) -> int:
        measured.append(path)
        return 10 * 2**30

    face = start_face(min_free_mb=1, free_bytes=free)
    measured.clear()
    client(face).store_instances(study(10))
    assert len(face.rows()) == 10
    assert len(measured) == 1
