"""Ingest: the checks on a dataset, and crash safety of changed resends step by step."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import Engine, select

from daemon.db import audit
from daemon.db.schema import AuditEvent, Instance, Study
from daemon.dicom import status
from daemon.receive.ingest import Ingestor, Refused, Request, check_request, read_identifiers
from daemon.spool import Spool

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm", download=False)))


def encoded(ds: Dataset, tmp_path: Path) -> bytes:
    """A dataset as pynetdicom's `encoded_dataset()` gives it: a Part 10 stream."""
    path = tmp_path / f"{generate_uid()}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def ct(value: int = 0, like: Dataset | None = None) -> Dataset:
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID = like.StudyInstanceUID if like else generate_uid()
    ds.SeriesInstanceUID = like.SeriesInstanceUID if like else generate_uid()
    ds.SOPInstanceUID = like.SOPInstanceUID if like else generate_uid()
    pixels = bytearray(ds.PixelData)
    pixels[0] = value
    ds.PixelData = bytes(pixels)
    return ds


def request(ds: Dataset, tmp_path: Path, **over: Any) -> Request:
    fields = {
        "data": encoded(ds, tmp_path),
        "sop_class_uid": str(ds.SOPClassUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "calling_ae": "CT01",
        "peer": "127.0.0.1:1",
    }
    return Request(**{**fields, **over})


@pytest.fixture
def ingestor(engine: Engine, tmp_path: Path) -> Iterator[Ingestor]:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    ingestor = Ingestor(spool, engine, min_free_bytes=0)
    yield ingestor
    ingestor.close()


def rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(Instance).order_by(Instance.id)).all())


def assert_rows_name_their_bytes(engine: Engine) -> None:
    """The invariant: each row's path holds exactly that row's sha256."""
    for row in rows(engine):
        assert hashlib.sha256(Path(row.path).read_bytes()).hexdigest() == row.sha256


def current(engine: Engine) -> list[Any]:
    return [r for r in rows(engine) if r.superseded_at is None]


# Checks on the dataset -------------------------------------------------------------------


def test_identifiers_are_read_without_decoding_pixels(tmp_path: Path) -> None:
    ds = ct()
    ids = read_identifiers(encoded(ds, tmp_path))
    assert (ids.study_uid, ids.series_uid, ids.sop_instance_uid) == (
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
    )
    assert ids.modality == "CT"


def test_garbage_cannot_be_parsed() -> None:
    with pytest.raises(Refused) as err:
        read_identifiers(b"\x01\x02\x03" * 100)
    assert err.value.code in (status.CANNOT_PARSE_DATASET, status.MISSING_UID)


def test_truncated_stream_cannot_be_parsed(tmp_path: Path) -> None:
    data = encoded(ct(), tmp_path)
    with pytest.raises(Refused) as err:
        read_identifiers(data[:-100])
    assert err.value.code == status.CANNOT_PARSE_DATASET


def test_deflated_stream_is_read_whole_and_refused_when_truncated() -> None:
    data = Path(str(get_testdata_file("image_dfl.dcm", download=False))).read_bytes()
    assert read_identifiers(data).sop_instance_uid
    with pytest.raises(Refused) as err:
        read_identifiers(data[:-100])
    assert err.value.code == status.CANNOT_PARSE_DATASET


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_missing_uid_is_refused(tmp_path: Path, keyword: str) -> None:
    ds = ct()
    delattr(ds, keyword)
    with pytest.raises(Refused) as err:
        read_identifiers(encoded(ds, tmp_path))
    assert err.value.code == status.MISSING_UID
    assert keyword in err.value.detail


def test_command_and_dataset_must_agree(tmp_path: Path) -> None:
    ds = ct()
    with pytest.raises(Refused) as err:
        check_request(request(ds, tmp_path, sop_class_uid="1.2.840.10008.5.1.4.1.1.4"))
    assert err.value.code == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    with pytest.raises(Refused) as err:
        check_request(request(ds, tmp_path, sop_instance_uid=generate_uid()))
    assert err.value.code == status.SOP_INSTANCE_MISMATCH


def test_uid_that_cannot_be_a_path_is_refused_naming_the_attribute(tmp_path: Path) -> None:
    ds = ct()
    ds.StudyInstanceUID = "1.2.3/../../etc"
    with pytest.raises(Refused) as err:
        check_request(request(ds, tmp_path))
    assert err.value.code == status.INVALID_UID
    assert err.value.detail.startswith("StudyInstanceUID: ")


def test_harmless_malformed_uids_are_stored_under_encoded_names_and_warned_once_per_study(
    ingestor: Ingestor, engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study, series = "05fa52f0e599f17b8186ff18fcdf2b55", "1.2.0840.abc"
    slices = [ct(like=None), ct(like=None)]
    for ds in slices:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    with caplog.at_level(logging.WARNING, logger="daemon.receive"):
        for ds in slices:
            assert ingestor.store(request(ds, tmp_path)).Status == status.SUCCESS
    warned = [r for r in caplog.records if "malformed UID" in r.getMessage()]
    assert len(warned) == 1, "one line per study, not one per instance"
    assert warned[0].kv["attribute"] == "StudyInstanceUID,SeriesInstanceUID"  # type: ignore[attr-defined]
    assert len(rows(engine)) == 2
    for row in rows(engine):
        assert Path(row.path).parent == ingestor.spool.root / f"~{study}" / "~1.2.0840.abc"
        assert Path(row.path).is_file()


# Storage and its crash safety -------------------------------------------------------------


def test_new_instance_gets_the_study_version_and_bumps_last_received(
    ingestor: Ingestor, engine: Engine, tmp_path: Path
) -> None:
    ds = ct()
    assert ingestor.store(request(ds, tmp_path)).Status == status.SUCCESS
    with engine.connect() as conn:
        study = conn.execute(select(Study)).one()
    (row,) = rows(engine)
    assert row.study_version == study.version == 1
    first_seen = study.last_received_at
    assert ingestor.store(request(ct(like=None), tmp_path)).Status == status.SUCCESS
    assert ingestor.store(request(ct(1, like=ds), tmp_path)).Status == status.SUCCESS
    with engine.connect() as conn:
        study = conn.execute(select(Study).where(Study.study_uid == ds.StudyInstanceUID)).one()
    assert study.last_received_at >= first_seen


def _crash_once(target: Any, name: str, after: bool) -> Callable[[], None]:
    """Make `target.name` fail once with OSError, before or after doing its work."""
    original = getattr(target, name)
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            if after:
                original(*args, **kwargs)
            raise OSError(28, "simulated crash")
        return original(*args, **kwargs)

    setattr(target, name, failing)
    return lambda: setattr(target, name, original)


@pytest.mark.parametrize(
    ("step", "after"),
    [
        ("write_temp_file", False),  # the temporary file could not be written
        ("sync_dirs", True),  # renamed into place, a file that no row names
    ],
)
def test_a_failure_before_the_commit_answers_out_of_resources_and_the_resend_is_stored_once(
    ingestor: Ingestor, engine: Engine, tmp_path: Path, step: str, after: bool
) -> None:
    ds = ct()
    restore = _crash_once(ingestor.spool, step, after=after)
    assert ingestor.store(request(ds, tmp_path)).Status == status.OUT_OF_RESOURCES
    restore()
    assert rows(engine) == []
    assert list(ingestor.spool.tmp_dir.iterdir()) == []
    assert ingestor.store(request(ds, tmp_path)).Status == status.SUCCESS
    assert len(rows(engine)) == 1
    assert_rows_name_their_bytes(engine)


@pytest.mark.parametrize(
    ("step", "after"),
    [
        ("keep_aside", True),  # link made, its row update never committed
        ("rename_temp", False),  # older row moved aside and committed, new file never renamed
        ("rename_temp", True),  # new file renamed in, its row never committed
        ("sync_dirs", True),  # new file renamed and its directory synced, row never committed
    ],
)
def test_crash_during_changed_resend_never_loses_or_mislabels_the_older_bytes(
    ingestor: Ingestor, engine: Engine, tmp_path: Path, step: str, after: bool
) -> None:
    v1 = ct(1)
    v2 = ct(2, like=v1)
    assert ingestor.store(request(v1, tmp_path)).Status == status.SUCCESS
    restore = _crash_once(ingestor.spool, step, after=after)
    assert ingestor.store(request(v2, tmp_path)).Status == status.OUT_OF_RESOURCES
    restore()
    # After the "crash": version 1 is still the current one and its bytes are intact.
    assert_rows_name_their_bytes(engine)
    (only,) = current(engine)
    assert only.sha256 == hashlib.sha256(encoded(v1, tmp_path)).hexdigest()
    # The sender tries again: version 2 is current, version 1 superseded and kept.
    assert ingestor.store(request(v2, tmp_path)).Status == status.SUCCESS
    assert_rows_name_their_bytes(engine)
    old, new = rows(engine)
    assert old.superseded_at is not None and new.superseded_at is None
    assert new.sha256 == hashlib.sha256(encoded(v2, tmp_path)).hexdigest()
    assert Path(new.path) == ingestor.spool.instance_path(
        v1.StudyInstanceUID, v1.SeriesInstanceUID, v1.SOPInstanceUID
    )


def test_refused_and_duplicate_instances_leave_no_temporary_file(
    ingestor: Ingestor, tmp_path: Path
) -> None:
    ds = ct()
    assert ingestor.store(request(ds, tmp_path)).Status == status.SUCCESS
    assert ingestor.store(request(ds, tmp_path)).Status == status.SUCCESS
    bad = request(ds, tmp_path, sop_instance_uid=generate_uid())
    assert ingestor.store(bad).Status == status.SOP_INSTANCE_MISMATCH
    assert list(ingestor.spool.tmp_dir.iterdir()) == []


def test_an_identical_resend_puts_back_a_file_gone_from_the_spool(
    ingestor: Ingestor, engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = ct()
    assert ingestor.store(request(ds, tmp_path)).Status == status.SUCCESS
    (row,) = rows(engine)
    Path(row.path).unlink()  # lost outside pacs-ai: a disk error, a hand-made cleanup
    with caplog.at_level(logging.WARNING, logger="daemon.receive.ingest"):
        assert ingestor.store(request(ds, tmp_path)).Status == status.SUCCESS
    assert [r.id for r in rows(engine)] == [row.id]  # the same row, no new version
    assert_rows_name_their_bytes(engine)
    assert list(ingestor.spool.tmp_dir.iterdir()) == []
    (line,) = [r.getMessage() for r in caplog.records]
    assert "missing from the spool" in line


def test_a_resend_puts_back_a_restored_version_under_its_own_path_not_the_newer_ones(
    ingestor: Ingestor, engine: Engine, tmp_path: Path
) -> None:
    v1 = ct(1)
    v2 = ct(2, like=v1)
    for ds in (v1, v2, v1):  # v1 kept aside when v2 came, then made current again
        assert ingestor.store(request(ds, tmp_path)).Status == status.SUCCESS
    restored = next(r for r in current(engine))
    Path(restored.path).unlink()
    assert ingestor.store(request(v1, tmp_path)).Status == status.SUCCESS
    assert_rows_name_their_bytes(engine)  # v2's file, at the instance's path, untouched
    assert [r.path for r in current(engine)] == [restored.path]


def test_a_closed_ingestor_answers_out_of_resources(
    ingestor: Ingestor, engine: Engine, tmp_path: Path
) -> None:
    ingestor.close()
    assert ingestor.store(request(ct(), tmp_path)).Status == status.OUT_OF_RESOURCES
    assert rows(engine) == []


def test_each_study_is_audited_as_received_once_across_instances_and_receivers(
    ingestor: Ingestor, engine: Engine, tmp_path: Path
) -> None:
    first = ct()
    other_process = Ingestor(ingestor.spool, engine, min_free_bytes=0)
    try:
        for receiver in (ingestor, other_process, ingestor):
            ds = ct(like=first)
            ds.SOPInstanceUID = generate_uid()
            assert receiver.store(request(ds, tmp_path)).Status == status.SUCCESS
    finally:
        other_process.close()
    with engine.connect() as conn:
        events = conn.execute(
            select(AuditEvent.study_uid).where(AuditEvent.event == audit.STUDY_RECEIVED)
        ).scalars()
        assert list(events) == [first.StudyInstanceUID]


def test_series_uid_reused_in_another_study_is_refused(
    ingestor: Ingestor, engine: Engine, tmp_path: Path
) -> None:
    a = ct()
    b = ct()
    b.SeriesInstanceUID = a.SeriesInstanceUID
    assert ingestor.store(request(a, tmp_path)).Status == status.SUCCESS
    assert ingestor.store(request(b, tmp_path)).Status == status.SERIES_IN_OTHER_STUDY
    assert len(rows(engine)) == 1


def test_on_stored_is_called_after_commit_only(engine: Engine, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    calls: list[str] = []
    ingestor = Ingestor(spool, engine, 0, calls.append)
    ds = ct()
    ingestor.store(request(ds, tmp_path, sop_instance_uid=generate_uid()))
    assert calls == []
    ingestor.store(request(ds, tmp_path))
    assert calls == [ds.StudyInstanceUID]


def test_concurrent_stores_share_commits_and_keep_the_invariant(
    ingestor: Ingestor, engine: Engine, tmp_path: Path
) -> None:
    base = ct(1)
    versions = [ct(v, like=base) for v in (1, 2, 3)]
    others = [ct() for _ in range(8)]
    reqs = [request(ds, tmp_path) for ds in [*versions, *others, *versions]]
    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(lambda r: int(ingestor.store(r).Status), reqs))
    assert codes == [status.SUCCESS] * len(reqs)
    assert_rows_name_their_bytes(engine)
    mine = [r for r in rows(engine) if r.sop_instance_uid == base.SOPInstanceUID]
    assert len(mine) == 3
    assert len([r for r in mine if r.superseded_at is None]) == 1
    assert len(rows(engine)) == 3 + 8


def test_spool_reached_through_a_symlink_still_keeps_older_versions(
    engine: Engine, tmp_path: Path
) -> None:
    real = Spool(tmp_path / "spool")
    real.prepare()
    (tmp_path / "link").symlink_to(tmp_path / "spool")
    via_link = Spool(tmp_path / "link")
    v1 = ct(1)
    v2 = ct(2, like=v1)
    assert Ingestor(real, engine, 0).store(request(v1, tmp_path)).Status == status.SUCCESS
    assert Ingestor(via_link, engine, 0).store(request(v2, tmp_path)).Status == status.SUCCESS
    assert_rows_name_their_bytes(engine)
    assert len(current(engine)) == 1
