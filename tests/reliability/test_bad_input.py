"""Bad input against the real `serve`: each gets its answer, and the daemon serves the next study.

One daemon for the whole table (no workers: only the receiver is under test). Each row
sends one kind of bad input, files or wire-level, and names the answer the sender must see:
a DIMSE status, an association rejection (result, source, diagnostic), or the end of the
connection. After every row a C-ECHO and a good C-STORE still succeed and the good
instance is committed.
"""

from __future__ import annotations

import io
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, MRImageStorage
from sqlalchemy import Engine

from daemon.dicom import status
from daemon.dicom.commitment import MAX_REFERENCES, commitment_request
from tests.daemon_proc import Daemon, wait_for
from tests.integration.receive.helpers import (
    associate,
    ct_dataset,
    dataset_bytes,
    pydicom_file,
    reject_reason,
    send_raw,
    try_associate,
)
from tests.interop.conftest import daemon_config
from tests.modality import ModalitySimulator, mpps_create_attributes, mpps_set_attributes
from tests.reliability import harness as h

# The invalid UIDs below are the point of their rows; pydicom warns when it writes them.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")

AET = "PACSAI"
ALLOWED = ["TESTSCU", "GOODSCU", "DROPPER", "BIGPDU", "RAWSCU"]
MODALITY = "CT01"  # a [[sources]] entry: may ask for storage commitment
MAX_ASSOCIATIONS = 2
MAX_PDU = 16384

# What a sender sees: ("status", code) | ("rejected", (result, source, diagnostic)) |
# ("aborted",) an A-ABORT PDU | ("accepted-then-dropped",) | ("closed",) the server hung up.
Seen = tuple[Any, ...]


@dataclass(frozen=True)
class Ctx:
    port: int
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[Ctx], Seen]
    expected: Seen
    # The SOP Instance UID the case sent, which must not be committed (None: no instance).
    sop: str | None = None


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("bad-input")
    models = root / "no-models"
    models.mkdir()
    config = daemon_config(
        root,
        models,
        workers={"count": 0},
        dicom={
            "allowed_callers": ALLOWED,
            "max_associations": MAX_ASSOCIATIONS,
            "max_pdu": MAX_PDU,
            "acse_timeout": 10,
            "network_timeout": 10,
            "dimse_timeout": 10,
        },
    )
    config["sources"] = [{"name": "ct1", "ae_title": MODALITY, "host": "127.0.0.1", "port": 9}]
    workdir = root / "daemon"
    workdir.mkdir()
    d = Daemon(workdir, config).start()
    yield d
    d.kill()


# Senders ------------------------------------------------------------------------------


def _encoded(ds: Dataset, tmp_path: Path) -> bytes:
    """The dataset's bytes as they go over the wire (after the file meta)."""
    path = tmp_path / f"enc-{generate_uid()}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return dataset_bytes(path)


def _raw(ctx: Ctx, payload: bytes, sop: str, sop_class: str = CTImageStorage, **kw: Any) -> Seen:
    code = send_raw(
        ctx.port,
        ctx.tmp_path,
        payload,
        sop_class=sop_class,
        sop_instance=sop,
        monkeypatch=ctx.monkeypatch,
        **kw,
    )
    return ("status", code)


def _without(keyword: str, sop: str) -> Callable[[Ctx], Seen]:
    def send(ctx: Ctx) -> Seen:
        ds = ct_dataset(sop=sop)
        delattr(ds, keyword)
        return _raw(ctx, _encoded(ds, ctx.tmp_path), sop)

    return send


def _with_uid(keyword: str, value: str, sop: str) -> Callable[[Ctx], Seen]:
    def send(ctx: Ctx) -> Seen:
        ds = ct_dataset(sop=sop)
        setattr(ds, keyword, value)
        command_sop = value if keyword == "SOPInstanceUID" else sop
        return _raw(ctx, _encoded(ds, ctx.tmp_path), command_sop)

    return send


def _pydicom_test_file(name: str) -> Callable[[Ctx], Seen]:
    """One of pydicom's own broken test files, sent as its dataset bytes under its own meta."""

    def send(ctx: Ctx) -> Seen:
        path = pydicom_file(name)
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        return _raw(
            ctx,
            dataset_bytes(path),
            str(meta.get("MediaStorageSOPInstanceUID") or generate_uid()),
            sop_class=str(meta.get("MediaStorageSOPClassUID") or CTImageStorage),
            syntax=str(meta.TransferSyntaxUID),
        )

    return send


def _sop_class_mismatch(sop: str) -> Callable[[Ctx], Seen]:
    def send(ctx: Ctx) -> Seen:
        ds = ct_dataset(sop=sop)
        ds.SOPClassUID = MRImageStorage
        return _raw(ctx, _encoded(ds, ctx.tmp_path), sop)

    return send


def _sop_instance_mismatch(sop: str) -> Callable[[Ctx], Seen]:
    def send(ctx: Ctx) -> Seen:
        ds = ct_dataset(sop=sop)
        return _raw(ctx, _encoded(ds, ctx.tmp_path), generate_uid())

    return send


def _associate_as(called: str = AET, calling: str = "TESTSCU") -> Callable[[Ctx], Seen]:
    def send(ctx: Ctx) -> Seen:
        assoc = try_associate(ctx.port, called=called, calling=calling)
        if assoc.is_established:
            assoc.release()
            return ("established",)
        return ("rejected", reject_reason(assoc))

    return send


def _one_too_many(ctx: Ctx) -> Seen:
    held: list[Any] = []

    def hold_one_more() -> bool:
        assoc = try_associate(ctx.port)
        if assoc.is_established:
            held.append(assoc)
        return len(held) == MAX_ASSOCIATIONS

    try:
        # Associations of the previous row may still be winding down: fill up to the limit.
        wait_for(hold_one_more, 30, f"{MAX_ASSOCIATIONS} associations held", interval=0.2)
        extra = try_associate(ctx.port)
        return ("rejected", reject_reason(extra)) if extra.is_rejected else ("established",)
    finally:
        for assoc in held:
            assoc.release()


def _read_until_closed(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _garbage_bytes(ctx: Ctx) -> Seen:
    with socket.create_connection(("127.0.0.1", ctx.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)))
        answer = sock.recv(10)
    return ("aborted",) if answer[:1] == b"\x07" else ("closed", answer[:1])


def _associate_rq_pdu(calling: str) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = AET
    length = MaximumLengthNotification()
    length.maximum_length_received = MAX_PDU
    prim.user_information = [length]
    contexts = [build_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    for i, cx in enumerate(contexts):
        cx.context_id = 2 * i + 1
    prim.presentation_context_definition_list = contexts
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def _associate_rq_then_drop(ctx: Ctx) -> Seen:
    with socket.create_connection(("127.0.0.1", ctx.port), timeout=10) as sock:
        sock.sendall(_associate_rq_pdu("RAWSCU"))
        answer = sock.recv(1)
    return ("accepted-then-dropped",) if answer == b"\x02" else ("closed", answer)


def _c_store_pdus(ds: Dataset, context_id: int = 1) -> list[bytes]:
    """A C-STORE-RQ for `ds` (Explicit VR LE) as P-DATA-TF PDUs within MAX_PDU."""
    prim = C_STORE()
    prim.MessageID = 1
    prim.AffectedSOPClassUID = ds.SOPClassUID
    prim.AffectedSOPInstanceUID = ds.SOPInstanceUID
    prim.Priority = 2
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)
    prim.DataSet = io.BytesIO(buf.getvalue())
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    pdus = []
    for p_data in msg.encode_msg(context_id, MAX_PDU):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        pdus.append(bytes(pdu.encode()))
    return pdus


def _p_data_truncated(sop: str) -> Callable[[Ctx], Seen]:
    def send(ctx: Ctx) -> Seen:
        ds = ct_dataset(sop=sop)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        pdus = _c_store_pdus(ds)
        assert len(pdus) > 2
        with socket.create_connection(("127.0.0.1", ctx.port), timeout=10) as sock:
            sock.sendall(_associate_rq_pdu("DROPPER"))
            assert sock.recv(65536)[:1] == b"\x02", "association not accepted"
            for pdu in pdus[: len(pdus) // 2]:  # the command and half the data set
                sock.sendall(pdu)
            sock.shutdown(socket.SHUT_WR)
            _read_until_closed(sock)
        return ("closed",)

    return send


def _oversized_pdu(ctx: Ctx) -> Seen:
    with socket.create_connection(("127.0.0.1", ctx.port), timeout=10) as sock:
        sock.sendall(_associate_rq_pdu("BIGPDU"))
        assert sock.recv(65536)[:1] == b"\x02", "association not accepted"
        # A P-DATA-TF announcing 64 MiB against our 16 KiB maximum, a little of it, then EOF.
        sock.sendall(struct.pack(">BBL", 0x04, 0, 64 * 2**20) + b"\x00" * 1000)
        sock.shutdown(socket.SHUT_WR)
        answer = _read_until_closed(sock)
    return ("aborted",) if answer[:1] == b"\x07" else ("closed",)


def _empty_dataset(sop: str) -> Callable[[Ctx], Seen]:
    def send(ctx: Ctx) -> Seen:
        return _raw(ctx, b"", sop)

    return send


def _garbage_dataset(sop: str) -> Callable[[Ctx], Seen]:
    def send(ctx: Ctx) -> Seen:
        return _raw(ctx, b"\xff\xfe not DICOM " * 64, sop)

    return send


def _commitment(calling: str, info: Callable[[], Dataset]) -> Callable[[Ctx], Seen]:
    def send(ctx: Ctx) -> Seen:
        sim = ModalitySimulator(calling)
        with sim.associate(ctx.port, storage=False) as assoc:
            return ("status", sim.request_commitment(assoc, "", [], info=info()))

    return send


def _references(count: int, sop: str = "") -> Dataset:
    return commitment_request(
        generate_uid(), [(CTImageStorage, sop or f"1.2.3.{i}") for i in range(count)]
    )


def _without_instance_uid() -> Dataset:
    info = _references(1)
    del info.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return info


def _mpps(*steps: Callable[[ModalitySimulator, Any, str], int]) -> Callable[[Ctx], Seen]:
    """Run the MPPS messages in order on one association; the status of the last."""

    def send(ctx: Ctx) -> Seen:
        sim = ModalitySimulator(MODALITY)
        step = generate_uid()
        with sim.associate(ctx.port, storage=False) as assoc:
            answers = [message(sim, assoc, step) for message in steps]
        return ("status", answers[-1])

    return send


def _create(change: Callable[[Dataset], None] = lambda ds: None) -> Any:
    def message(sim: ModalitySimulator, assoc: Any, step: str) -> int:
        attributes = mpps_create_attributes(generate_uid())
        change(attributes)
        return sim.mpps_create(assoc, step, attributes)

    return message


def _complete(sim: ModalitySimulator, assoc: Any, step: str) -> int:
    done = mpps_set_attributes("COMPLETED", {generate_uid(): [(CTImageStorage, generate_uid())]})
    return sim.mpps_set(assoc, step, done)


# The table ----------------------------------------------------------------------------


def _cases() -> list[Case]:
    sops = iter(generate_uid() for _ in range(32))
    cases = []

    def add(name: str, make: Callable[[str], Callable[[Ctx], Seen]], expected: Seen) -> None:
        sop = next(sops)
        cases.append(Case(name, make(sop), expected, sop))

    add("unparseable-dataset", _garbage_dataset, ("status", status.CANNOT_PARSE_DATASET))
    add("empty-dataset", _empty_dataset, ("status", status.CANNOT_PARSE_DATASET))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        add(
            f"missing-{keyword}",
            lambda sop, k=keyword: _without(k, sop),
            ("status", status.MISSING_UID),
        )
    add(
        "sop-class-mismatch",
        _sop_class_mismatch,
        ("status", status.DATASET_DOES_NOT_MATCH_SOP_CLASS),
    )
    add("sop-instance-mismatch", _sop_instance_mismatch, ("status", status.SOP_INSTANCE_MISMATCH))
    add(
        "uid-with-empty-component",
        lambda sop: _with_uid("StudyInstanceUID", "1.2..3", sop),
        ("status", status.INVALID_UID),
    )
    add(
        "uid-with-control-character",
        lambda sop: _with_uid("SeriesInstanceUID", "1.2.\x1b[2J.4", sop),
        ("status", status.INVALID_UID),
    )
    add(
        "path-traversal-uid",
        lambda sop: _with_uid("StudyInstanceUID", "../../../etc/passwd", sop),
        ("status", status.INVALID_UID),
    )
    add(
        "path-traversal-sop-uid",
        lambda sop: _with_uid("SOPInstanceUID", "1.2/../../x", sop),
        ("status", status.INVALID_UID),
    )
    add("p-data-truncated-mid-dataset", _p_data_truncated, ("closed",))
    cases += [
        Case(
            "pydicom-MR_truncated",
            _pydicom_test_file("MR_truncated.dcm"),
            ("status", status.CANNOT_PARSE_DATASET),
        ),
        Case(
            "pydicom-rtplan_truncated",
            _pydicom_test_file("rtplan_truncated.dcm"),
            ("status", status.CANNOT_PARSE_DATASET),
        ),
        Case(
            "pydicom-nested_priv_SQ",
            _pydicom_test_file("nested_priv_SQ.dcm"),
            ("status", status.MISSING_UID),
        ),
        Case(
            "wrong-called-ae",
            _associate_as(called="NOTPACSAI"),
            ("rejected", status.REJECT_CALLED_AE),
        ),
        Case(
            "unknown-calling-ae",
            _associate_as(calling="INTRUDER"),
            ("rejected", status.REJECT_CALLING_AE),
        ),
        Case("too-many-associations", _one_too_many, ("rejected", status.REJECT_LOCAL_LIMIT)),
        Case("garbage-bytes-on-the-port", _garbage_bytes, ("aborted",)),
        Case("associate-rq-then-tcp-drop", _associate_rq_then_drop, ("accepted-then-dropped",)),
        # pynetdicom does not hold a peer to our maximum PDU length: it reads on until the
        # announced length or EOF. The association ends when the sender stops, nothing kept.
        Case("oversized-pdu", _oversized_pdu, ("closed",)),
        # The modality services (PS3.4 Annex J and F).
        Case(
            "commitment-from-an-ae-outside-sources",
            _commitment("TESTSCU", lambda: _references(1)),
            ("status", status.NOT_AUTHORIZED),
        ),
        Case(
            "commitment-malformed-referenced-sop-sequence",
            _commitment(MODALITY, _without_instance_uid),
            ("status", status.INVALID_ARGUMENT_VALUE),
        ),
        Case(
            "commitment-naming-too-many-instances",
            _commitment(MODALITY, lambda: _references(MAX_REFERENCES + 1)),
            ("status", status.RESOURCE_LIMITATION),
        ),
        Case(
            "mpps-create-without-a-required-attribute",
            _mpps(_create(lambda ds: delattr(ds, "Modality"))),
            ("status", status.MISSING_ATTRIBUTE),
        ),
        Case(
            "mpps-set-of-an-unknown-step",
            _mpps(_complete),
            ("status", status.NO_SUCH_OBJECT_INSTANCE),
        ),
        Case(
            "mpps-set-of-a-completed-step",
            _mpps(_create(), _complete, _complete),
            ("status", status.PROCESSING_FAILURE),
        ),
    ]
    return cases


CASES = _cases()


def _serves_a_good_instance(port: int, engine: Engine) -> None:
    """C-ECHO and a good C-STORE succeed (retrying while a dropped association winds down)."""

    def attempt() -> bool:
        echo = try_associate(port, calling="GOODSCU")
        if not echo.is_established:
            return False
        ok = echo.send_c_echo().Status == status.SUCCESS
        echo.release()
        return ok

    wait_for(attempt, 30, "a C-ECHO to be answered")
    good = ct_dataset()
    with associate(port, calling="GOODSCU") as assoc:
        assert assoc.send_c_store(good).Status == status.SUCCESS
    assert good.SOPInstanceUID in {r.sop_instance_uid for r in h.instance_rows(engine)}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_its_answer_and_the_daemon_serves_the_next_study(
    daemon: Daemon, case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(CASES) >= 15
    engine = h.daemon_database(daemon)
    try:
        seen = case.send(Ctx(daemon.port, tmp_path, monkeypatch))
        assert seen == case.expected
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
        if case.sop is not None:
            time.sleep(0.2)  # a handler still running would commit now, not later
            assert case.sop not in {r.sop_instance_uid for r in h.instance_rows(engine)}
        _serves_a_good_instance(daemon.port, engine)
        assert daemon.proc is not None and daemon.proc.poll() is None
        h.assert_spool_holds_only_committed_instances(daemon.config["storage"]["spool_dir"], engine)
    finally:
        engine.dispose()


def test_a_pdu_longer_than_max_pdu_is_refused_before_it_is_buffered(daemon: Daemon) -> None:
    """A peer announcing a P-DATA-TF far beyond our maximum PDU length is cut off at once.

    pynetdicom alone reads on until the announced length arrives, so one association could
    make `serve` hold gigabytes; the receiver refuses before buffering.
    """
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(_associate_rq_pdu("BIGPDU"))
        assert sock.recv(65536)[:1] == b"\x02", "association not accepted"
        sock.sendall(struct.pack(">BBL", 0x04, 0, 64 * 2**20))
        answer = b""
        try:
            for _ in range(8):  # 8 x 256 KiB = 128 times our maximum PDU length
                sock.sendall(b"\0" * 2**18)
            sock.settimeout(5)
            answer = sock.recv(10)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""  # cut off while sending: what we want
        except TimeoutError:
            pytest.fail("the receiver is still reading a PDU 128 times larger than max_pdu")
    assert answer[:1] in (b"\x07", b""), "an A-ABORT or a closed connection"
