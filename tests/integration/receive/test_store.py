"""C-STORE: durable before acknowledged, stored as sent, duplicates and changed resends."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import _config
from sqlalchemy import Engine, select, update

from daemon.db.schema import Instance, utcnow
from daemon.dicom import status
from tests.integration.receive.helpers import (
    STORESCU,
    associate,
    ct_dataset,
    dataset_bytes,
    dcmtk,
    instance_rows,
    pydicom_file,
    require_dcmtk,
    study_row,
)

# pydicom's own files, one per transfer syntax family the receiver must keep as sent.
SYNTAX_FILES = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",  # implicit VR little endian
    "image_dfl.dcm",  # deflated explicit VR little endian
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "SC_jpeg_no_color_transform.dcm",  # JPEG baseline
    "JPGExtended.dcm",  # JPEG extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "JPEG2000.dcm",  # JPEG 2000
    "MR_small_RLE.dcm",  # RLE lossless
]


def test_dcmtk_storescu_study_is_stored_with_rows(
    engine: Engine, start_receiver, port: int, spool_dir: Path, stored: list[str]
) -> None:
    require_dcmtk()
    start_receiver(engine)
    files = [pydicom_file(n) for n in ("CT_small.dcm", "MR_small.dcm")]
    result = dcmtk(STORESCU, "-aec", "PACSAI", "127.0.0.1", str(port), *files)
    assert result.returncode == 0, result.stderr
    rows = instance_rows(engine)
    assert len(rows) == 2
    for src in files:
        ds = dcmread(src, stop_before_pixels=True)
        (row,) = [r for r in rows if r.sop_instance_uid == ds.SOPInstanceUID]
        expected = (
            spool_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / (f"{ds.SOPInstanceUID}.dcm")
        )
        assert Path(row.path) == expected
        assert hashlib.sha256(expected.read_bytes()).hexdigest() == row.sha256
        assert row.size == expected.stat().st_size
        assert row.study_version == study_row(engine, ds.StudyInstanceUID).version
        assert row.calling_ae == "STORESCU"
        assert row.superseded_at is None
    assert sorted(set(stored)) == sorted(
        {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    )
    assert not list((spool_dir / ".tmp").iterdir())


@pytest.mark.parametrize("name", SYNTAX_FILES)
def test_transfer_syntax_is_accepted_and_stored_as_sent(
    sqlite_engine: Engine, start_receiver, port: int, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunked sending puts the file's dataset bytes on the wire unchanged.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    src = pydicom_file(name)
    ds = dcmread(src)
    syntax = ds.file_meta.TransferSyntaxUID
    start_receiver(sqlite_engine)
    with associate(port, [(ds.SOPClassUID, [syntax])]) as assoc:
        assert assoc.send_c_store(src).Status == status.SUCCESS
    (row,) = instance_rows(sqlite_engine)
    assert row.transfer_syntax_uid == syntax
    kept = dcmread(row.path)
    assert kept.file_meta.TransferSyntaxUID == syntax
    assert dataset_bytes(Path(row.path)) == dataset_bytes(src)


def test_instance_is_acknowledged_only_after_commit(
    engine: Engine, start_receiver, port: int
) -> None:
    seen: list[tuple[int, bool]] = []
    ds = ct_dataset()

    def on_stored(study_uid: str) -> None:
        # Runs after the commit and before the response goes out: row and file are there.
        with engine.connect() as conn:
            rows = conn.execute(
                select(Instance.path, Instance.sha256).where(
                    Instance.sop_instance_uid == ds.SOPInstanceUID
                )
            ).all()
        ok = len(rows) == 1 and (
            hashlib.sha256(Path(rows[0].path).read_bytes()).hexdigest() == rows[0].sha256
        )
        seen.append((len(rows), ok))

    start_receiver(engine, on_stored=on_stored)
    with associate(port) as assoc:
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    assert seen == [(1, True)]


def test_identical_resend_is_acknowledged_without_a_new_row(
    engine: Engine, start_receiver, port: int
) -> None:
    ds = ct_dataset()
    start_receiver(engine)
    with associate(port) as assoc:
        assert assoc.send_c_store(ds).Status == status.SUCCESS
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    (row,) = instance_rows(engine)
    assert row.superseded_at is None
    assert study_row(engine, ds.StudyInstanceUID).changed_at is None


def test_identical_resend_after_retention_purged_the_file_revives_the_same_row(
    engine: Engine, start_receiver, port: int
) -> None:
    ds = ct_dataset()
    start_receiver(engine)
    with associate(port) as assoc:
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    (stored,) = instance_rows(engine)
    Path(stored.path).unlink()  # what retention does: file removed, row kept, deleted_at set
    with engine.begin() as conn:
        conn.execute(
            update(Instance).where(Instance.id == stored.id).values(deleted_at=utcnow())
        )
    with associate(port) as assoc:
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    (revived,) = instance_rows(engine)
    assert revived.id == stored.id
    assert revived.deleted_at is None and revived.superseded_at is None
    assert Path(revived.path).is_file()


def test_changed_resend_is_stored_as_newer_version_and_older_bytes_kept(
    engine: Engine, start_receiver, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    first = ct_dataset(value=1)
    second = ct_dataset(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID, 2)
    start_receiver(engine)
    with associate(port) as assoc:
        assert assoc.send_c_store(first).Status == status.SUCCESS
        (old,) = instance_rows(engine)
        with caplog.at_level(logging.WARNING, logger="daemon.receive"):
            assert assoc.send_c_store(second).Status == status.SUCCESS
    older, newer = instance_rows(engine, first.SOPInstanceUID)
    assert older.id == old.id and older.superseded_at is not None
    assert newer.superseded_at is None and newer.sha256 != older.sha256
    assert newer.path == old.path, "the current version keeps the canonical name"
    assert older.path != newer.path
    for row in (older, newer):
        assert hashlib.sha256(Path(row.path).read_bytes()).hexdigest() == row.sha256
    assert study_row(engine, first.StudyInstanceUID).changed_at is not None
    assert any("newer version" in r.getMessage() for r in caplog.records)


def test_older_version_sent_again_becomes_current_again(
    sqlite_engine: Engine, start_receiver, port: int
) -> None:
    first = ct_dataset(value=1)
    second = ct_dataset(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID, 2)
    start_receiver(sqlite_engine)
    with associate(port) as assoc:
        for ds in (first, second, first):
            assert assoc.send_c_store(ds).Status == status.SUCCESS
    rows = instance_rows(sqlite_engine, first.SOPInstanceUID)
    assert len(rows) == 2
    current = [r for r in rows if r.superseded_at is None]
    assert len(current) == 1 and current[0].id == rows[0].id
    for row in rows:
        assert hashlib.sha256(Path(row.path).read_bytes()).hexdigest() == row.sha256


def test_several_processes_store_and_report_to_the_parent(
    sqlite_engine: Engine, start_receiver, port: int, stored: list[str]
) -> None:
    receiver = start_receiver(sqlite_engine, processes=2)
    datasets = [ct_dataset() for _ in range(6)]
    for ds in datasets:
        with associate(port) as assoc:
            assert assoc.send_c_store(ds).Status == status.SUCCESS
    receiver.stop(2.0)
    assert len(instance_rows(sqlite_engine)) == 6
    assert sorted(stored) == sorted(str(ds.StudyInstanceUID) for ds in datasets)
