"""Storage Commitment as SCP over loopback: a modality asks, the receiver reports, on
SQLite and PostgreSQL (the `engine` fixture)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import CTImageStorage, MRImageStorage
from sqlalchemy import Engine, select, update

from daemon.db import queue
from daemon.db.keys import COMMITMENT_REPORT
from daemon.db.schema import CommitmentRequest, Job, utcnow
from daemon.dicom.commitment import MAX_REFERENCES
from daemon.dicom.status import (
    CLASS_INSTANCE_CONFLICT,
    INVALID_ARGUMENT_VALUE,
    NO_SUCH_OBJECT_INSTANCE,
    NOT_AUTHORIZED,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
)
from daemon.receive import Receiver
from daemon.receive.commitment_scp import HOLD_SECONDS, deliver
from tests.daemon_proc import wait_for
from tests.integration.receive.helpers import ct_dataset, try_associate
from tests.modality import ModalitySimulator, references
from tests.peers import free_port

REPORT_TIMEOUT = 15.0

Start = Callable[..., Receiver]


@pytest.fixture
def start(start_receiver: Callable[..., Receiver]) -> Start:
    """start(engine, [sources], **dicom) -> a running Receiver with those [[sources]]."""

    def make(engine: Engine, sources: list[dict[str, Any]], **dicom: Any) -> Receiver:
        return start_receiver(engine, sources=sources, **dicom)

    return make


def source(ct: ModalitySimulator, port: int | None = None) -> dict[str, Any]:
    return {"name": "ct1", "ae_title": ct.aet, "host": ct.host, "port": port or ct.port}


def study(n: int) -> list[Dataset]:
    study_uid, series_uid = generate_uid(), generate_uid()
    return [ct_dataset(study=study_uid, series=series_uid) for _ in range(n)]


def request_row(engine: Engine, transaction_uid: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(CommitmentRequest).where(CommitmentRequest.transaction_uid == transaction_uid)
        ).one()


def report_jobs(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(Job).where(Job.kind == COMMITMENT_REPORT).order_by(Job.id)).all()
        )


def settled(engine: Engine) -> list[Any]:
    """The report jobs once none is running (the receiver's first attempt is over)."""
    return wait_for(
        lambda: (jobs := report_jobs(engine)) and all(j.state != "running" for j in jobs) and jobs,
        REPORT_TIMEOUT,
        "the receiver's first attempt",
    )


def test_report_comes_on_the_association_the_modality_holds_open(
    engine: Engine, start: Start, port: int
) -> None:
    images = study(3)
    missing = generate_uid()
    transaction = generate_uid()
    with ModalitySimulator("CT01") as ct:
        start(engine, [source(ct)])
        with ct.associate(port) as assoc:
            assert ct.store(assoc, images) == [0, 0, 0]
            asked = [
                *references(images),
                (CTImageStorage, missing),
                (MRImageStorage, str(images[0].SOPInstanceUID)),
            ]
            assert ct.request_commitment(assoc, transaction, asked, hold=REPORT_TIMEOUT) == 0
        got = ct.wait_for_report(transaction, REPORT_TIMEOUT)
    assert got.same_association
    assert sorted(got.report.committed) == sorted(str(ds.SOPInstanceUID) for ds in images)
    assert sorted(got.report.failed) == sorted(
        [
            (missing, NO_SUCH_OBJECT_INSTANCE),
            (str(images[0].SOPInstanceUID), CLASS_INSTANCE_CONFLICT),
        ]
    )
    row = request_row(engine, transaction)
    assert (row.state, row.calling_ae, len(row.committed), len(row.failed)) == (
        "reported",
        "CT01",
        3,
        2,
    )
    assert [j.state for j in settled(engine)] == ["done"]


def test_report_comes_on_a_new_association_when_the_modality_releases(
    engine: Engine, start: Start, port: int
) -> None:
    images = study(2)
    transaction = generate_uid()
    with ModalitySimulator("CT01") as ct:
        start(engine, [source(ct)])
        with ct.associate(port) as assoc:
            ct.store(assoc, images)
            assert ct.request_commitment(assoc, transaction, references(images)) == 0
        got = ct.wait_for_report(transaction, REPORT_TIMEOUT)
        assert not got.same_association
        assert got.report.success
        assert len(ct.reports(transaction)) == 1
    assert request_row(engine, transaction).state == "reported"


# A modality that releases while the receiver waits to see whether it holds the association:
# each release is a race between that wait and the association answering it.
RELEASES_WITHIN_THE_HOLD = 15


def test_a_release_during_the_hold_is_answered_and_the_report_comes_on_a_new_association(
    engine: Engine, start: Start, port: int
) -> None:
    with ModalitySimulator("CT01") as ct:
        start(engine, [source(ct)])
        for _ in range(RELEASES_WITHIN_THE_HOLD):
            images, transaction = study(1), generate_uid()
            with ct.associate(port, timeout=3) as assoc:
                ct.store(assoc, images)
                assert ct.request_commitment(assoc, transaction, references(images)) == 0
                time.sleep(HOLD_SECONDS / 2)
            assert assoc.is_released and not assoc.is_aborted, "the release went unanswered"
            assert not ct.wait_for_report(transaction, REPORT_TIMEOUT).same_association


def test_modality_outside_sources_is_refused(
    engine: Engine, start: Start, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    images = study(1)
    with ModalitySimulator("CT01") as ct, ModalitySimulator("STRANGER") as stranger:
        start(engine, [source(ct)])
        with caplog.at_level(logging.WARNING), stranger.associate(port) as assoc:
            assert stranger.store(assoc, images) == [0]  # any caller may store (allowed_callers)
            assert stranger.request_commitment(assoc, generate_uid(), references(images)) == (
                NOT_AUTHORIZED
            )
    assert report_jobs(engine) == []
    lines = [r for r in caplog.records if "sources" in r.getMessage()]
    assert len(lines) == 1


def test_sources_are_callers_beside_allowed_callers(
    engine: Engine, start: Start, port: int
) -> None:
    with ModalitySimulator("CT01") as ct:
        start(engine, [source(ct)], allowed_callers=["ROUTER"])
        assert try_associate(port, calling="CT01").is_established
        assert try_associate(port, calling="ROUTER").is_established
        refused = try_associate(port, calling="STRANGER")
        assert refused.is_rejected


def _malformed_sequence() -> Dataset:
    info = Dataset()
    info.TransactionUID = generate_uid()
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage  # no Referenced SOP Instance UID
    info.ReferencedSOPSequence = [item]
    return info


def _bad_uid() -> Dataset:
    info = Dataset()
    info.TransactionUID = generate_uid()
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = "1.2." + "3" * 62  # 66 characters
    info.ReferencedSOPSequence = [item]
    return info


@pytest.mark.parametrize("info", [_malformed_sequence, _bad_uid], ids=["no-instance", "bad-uid"])
def test_malformed_referenced_sop_sequence_is_refused(
    engine: Engine, start: Start, port: int, info: Callable[[], Dataset]
) -> None:
    with ModalitySimulator("CT01") as ct:
        start(engine, [source(ct)])
        with ct.associate(port) as assoc:
            status = ct.request_commitment(assoc, "", [], info=info())
            assert status == INVALID_ARGUMENT_VALUE
            assert ct.store(assoc, study(1)) == [0]  # the association still serves
    assert report_jobs(engine) == []


def test_thousands_of_instances_are_answered_and_beyond_the_bound_refused(
    engine: Engine, start: Start, port: int
) -> None:
    transaction = generate_uid()
    asked = [(CTImageStorage, generate_uid()) for _ in range(5000)]
    with ModalitySimulator("CT01") as ct:
        start(engine, [source(ct)])
        with ct.associate(port, storage=False) as assoc:
            assert ct.request_commitment(assoc, transaction, asked, hold=REPORT_TIMEOUT) == 0
            too_many = [(CTImageStorage, f"1.2.3.{i}") for i in range(MAX_REFERENCES + 1)]
            assert ct.request_commitment(assoc, generate_uid(), too_many) == RESOURCE_LIMITATION
        got = ct.wait_for_report(transaction, REPORT_TIMEOUT)
    assert len(got.report.failed) == 5000 and not got.report.committed
    assert len(report_jobs(engine)) == 1


def _make_due(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.kind == COMMITMENT_REPORT).values(run_after=utcnow()))


def _worker_delivers(engine: Engine, receiver: Receiver) -> None:
    """What a worker does with the queued report job."""
    _make_due(engine)
    job = queue.claim(engine, "test-worker", [COMMITMENT_REPORT], lease_seconds=60)
    assert job is not None
    deliver(engine, receiver.settings, job, "test-worker")


def test_report_the_modality_refuses_is_retried_and_nothing_is_lost(
    engine: Engine, start: Start, port: int
) -> None:
    images = study(2)
    transaction = generate_uid()
    with ModalitySimulator("CT01", report_status=PROCESSING_FAILURE) as ct:
        receiver = start(engine, [source(ct)])
        with ct.associate(port) as assoc:
            ct.store(assoc, images)
            assert ct.request_commitment(assoc, transaction, references(images)) == 0
        ct.wait_for_report(transaction, REPORT_TIMEOUT)
        (job,) = settled(engine)
        assert (job.state, job.attempts) == ("queued", 1)
        assert "refused the N-EVENT-REPORT: 0x0110" in (job.last_error or "")
        assert request_row(engine, transaction).state == "pending"
        ct.report_status = 0x0000
        _worker_delivers(engine, receiver)
        assert [r.report.success for r in ct.reports(transaction)] == [True, True]
    assert request_row(engine, transaction).state == "reported"
    assert [j.state for j in report_jobs(engine)] == ["done"]


def test_unreachable_modality_gets_its_report_once_it_listens(
    engine: Engine, start: Start, port: int
) -> None:
    images = study(1)
    transaction = generate_uid()
    report_port = free_port()
    ct = ModalitySimulator("CT01")  # not listening yet
    receiver = start(engine, [source(ct, report_port)])
    with ct.associate(port) as assoc:
        ct.store(assoc, images)
        assert ct.request_commitment(assoc, transaction, references(images)) == 0
    (job,) = settled(engine)
    assert job.state == "queued" and "no association" in (job.last_error or "")
    ct.start(report_port)
    try:
        _worker_delivers(engine, receiver)
        assert len(ct.reports(transaction)) == 1
    finally:
        ct.stop()
    assert request_row(engine, transaction).state == "reported"
