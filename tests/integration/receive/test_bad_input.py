"""Bad input: refused with the standard's status, kept in quarantine, the next one served."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import CTImageStorage, MRImageStorage
from sqlalchemy import Engine

from daemon.dicom import status
from tests.integration.receive.helpers import (
    associate,
    ct_dataset,
    dataset_bytes,
    instance_rows,
    pydicom_file,
    quarantined,
    send_raw,
)


def _reason(path: Path) -> str:
    return path.with_suffix(".txt").read_text()


def _still_serving(port: int, engine: Engine) -> None:
    with associate(port) as assoc:
        assert assoc.send_c_store(ct_dataset()).Status == status.SUCCESS
    assert len(instance_rows(engine)) == 1


def test_garbage_dataset_is_refused_and_quarantined(
    sqlite_engine: Engine,
    start_receiver,
    port: int,
    spool_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start_receiver(sqlite_engine)
    code = send_raw(port, tmp_path, b"\xff\xfe garbage " * 50, monkeypatch=monkeypatch)
    assert 0xC000 <= code <= 0xCFFF
    (kept,) = quarantined(spool_dir)
    assert kept.read_bytes().endswith(b"\xff\xfe garbage " * 50)
    assert "reason:" in _reason(kept)
    assert instance_rows(sqlite_engine) == []


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_truncated_pydicom_file_is_refused_and_quarantined(
    sqlite_engine: Engine,
    start_receiver,
    port: int,
    spool_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    name: str,
) -> None:
    from pydicom import dcmread
    from pynetdicom import _config

    src = pydicom_file(name)
    ds = dcmread(src, stop_before_pixels=True)
    start_receiver(sqlite_engine)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    with associate(port, [(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])]) as assoc:
        code = int(assoc.send_c_store(src).Status)
    assert code == status.CANNOT_PARSE_DATASET
    (kept,) = quarantined(spool_dir)
    assert "unparsable" in _reason(kept)
    assert instance_rows(sqlite_engine) == []


def test_dataset_without_study_uid_is_refused(
    sqlite_engine: Engine, start_receiver, port: int, spool_dir: Path
) -> None:
    ds = ct_dataset()
    del ds.StudyInstanceUID
    start_receiver(sqlite_engine)
    with associate(port) as assoc:
        rsp = assoc.send_c_store(ds)
    assert rsp.Status == status.MISSING_UID
    (kept,) = quarantined(spool_dir)
    assert "StudyInstanceUID" in _reason(kept)
    assert instance_rows(sqlite_engine) == []


def _encoded(ds: Dataset, tmp_path: Path) -> bytes:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return dataset_bytes(path)


def test_sop_class_differing_from_the_command_is_answered_a900(
    sqlite_engine: Engine,
    start_receiver,
    port: int,
    spool_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ds = ct_dataset()
    ds.SOPClassUID = MRImageStorage
    start_receiver(sqlite_engine)
    code = send_raw(
        port,
        tmp_path,
        _encoded(ds, tmp_path),
        sop_class=CTImageStorage,
        sop_instance=ds.SOPInstanceUID,
        monkeypatch=monkeypatch,
    )
    assert code == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert len(quarantined(spool_dir)) == 1
    _still_serving(port, sqlite_engine)


def test_sop_instance_differing_from_the_command_is_refused(
    sqlite_engine: Engine,
    start_receiver,
    port: int,
    spool_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ds = ct_dataset()
    start_receiver(sqlite_engine)
    code = send_raw(
        port,
        tmp_path,
        _encoded(ds, tmp_path),
        sop_class=CTImageStorage,
        sop_instance=generate_uid(),
        monkeypatch=monkeypatch,
    )
    assert code == status.SOP_INSTANCE_MISMATCH
    assert len(quarantined(spool_dir)) == 1
    assert instance_rows(sqlite_engine) == []


def test_garbage_bytes_on_the_port_end_the_connection_and_the_next_is_served(
    sqlite_engine: Engine, start_receiver, port: int
) -> None:
    start_receiver(sqlite_engine)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)))
        answer = sock.recv(10)
    assert answer[:1] == b"\x07", "the receiver answers with an A-ABORT PDU"
    _still_serving(port, sqlite_engine)


def test_connection_dropped_mid_transfer_commits_nothing(
    sqlite_engine: Engine, start_receiver, port: int, spool_dir: Path
) -> None:
    start_receiver(sqlite_engine)
    ds = ct_dataset()
    from pynetdicom import AE

    ae = AE(ae_title="DROPPER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    # Send the command and half the data set by hand, then cut the TCP connection.
    sock = assoc.dul.socket.socket
    payload = bytes(ds.PixelData)[:20000]
    pdv = struct.pack(">LBB", len(payload) + 2, 1, 0x00) + payload
    sock.sendall(struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv)
    sock.shutdown(socket.SHUT_RDWR)
    assoc.abort()
    time.sleep(0.5)
    assert instance_rows(sqlite_engine) == []
    assert not [p for p in spool_dir.rglob("*.dcm") if "quarantine" not in p.parts]
    _still_serving(port, sqlite_engine)


def test_oversized_pdu_ends_the_association_and_the_next_is_served(
    sqlite_engine: Engine, start_receiver, port: int
) -> None:
    start_receiver(sqlite_engine, max_pdu=16384)
    from pynetdicom import AE

    ae = AE(ae_title="BIGPDU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    # A P-DATA-TF announcing 64 MiB against our 16 KiB maximum, then silence and close.
    sock.sendall(struct.pack(">BBL", 0x04, 0, 64 * 2**20) + b"\x00" * 1000)
    sock.shutdown(socket.SHUT_RDWR)
    assoc.abort()
    time.sleep(0.5)
    assert instance_rows(sqlite_engine) == []
    _still_serving(port, sqlite_engine)
