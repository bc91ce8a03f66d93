"""Senders and checks for the receiver's tests: pynetdicom and DCMTK SCUs, rows and files."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import Engine, select

from daemon.db.schema import Instance, Study

AET = "PACSAI"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"pydicom test file {name} is not installed")
    return Path(str(path))


def require_dcmtk() -> None:
    if not (Path(STORESCU).exists() and Path(ECHOSCU).exists()):
        if os.environ.get("CI"):
            pytest.fail("DCMTK is required under CI")
        pytest.skip("DCMTK not installed")


def dcmtk(cmd: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cmd, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


@contextmanager
def associate(
    port: int,
    contexts: list[tuple[str, list[str]]] | None = None,
    called: str = AET,
    calling: str = "TESTSCU",
) -> Iterator[Association]:
    """An established pynetdicom association (fails the test if it was not accepted)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for abstract, syntaxes in contexts or [(CTImageStorage, [ExplicitVRLittleEndian])]:
        ae.add_requested_context(abstract, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association was not accepted"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def try_associate(port: int, called: str = AET, calling: str = "TESTSCU") -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called)


def reject_reason(assoc: Association) -> tuple[int, int, int]:
    rj = assoc.acceptor.primitive
    return (rj.result, rj.result_source, rj.diagnostic)


def ct_dataset(
    study: str | None = None, series: str | None = None, sop: str | None = None, value: int = 0
) -> Dataset:
    """A small CT image with fresh (or given) UIDs; `value` changes its pixel bytes."""
    ds = dcmread(pydicom_file("CT_small.dcm"))
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if value:
        pixels = bytearray(ds.PixelData)
        pixels[0] = value & 0xFF
        ds.PixelData = bytes(pixels)
    return ds


def send_raw(
    port: int,
    tmp_path: Path,
    payload: bytes,
    *,
    sop_class: str = CTImageStorage,
    sop_instance: str = "1.2.3.4",
    syntax: str = ExplicitVRLittleEndian,
    monkeypatch: pytest.MonkeyPatch,
) -> int:
    """C-STORE `payload` as the dataset bytes, unparsed, with the command UIDs given."""
    meta = Dataset()
    meta.file_meta = _meta(sop_class, sop_instance, syntax)
    path = tmp_path / f"raw-{generate_uid()}.dcm"
    meta.save_as(path, enforce_file_format=True)
    with path.open("ab") as fh:
        fh.write(payload)
    # Chunked sending streams the file's dataset bytes as they are, without decoding them.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    with associate(port, [(sop_class, [syntax])]) as assoc:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status)


def _meta(sop_class: str, sop_instance: str, syntax: str) -> Any:
    from pydicom.dataset import FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    return meta


def instance_rows(engine: Engine, sop: str | None = None) -> list[Any]:
    query = select(Instance).order_by(Instance.id)
    if sop is not None:
        query = query.where(Instance.sop_instance_uid == sop)
    with engine.connect() as conn:
        return list(conn.execute(query).all())


def study_row(engine: Engine, study_uid: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(Study).where(Study.study_uid == study_uid)).one()


def quarantined(spool_dir: Path) -> list[Path]:
    return sorted((spool_dir / "quarantine").glob("*.dcm"))


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta: what went over the wire."""
    ds = dcmread(path, stop_before_pixels=True)
    with path.open("rb") as fh:
        data = fh.read()
    meta_len = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return data[meta_len:]
