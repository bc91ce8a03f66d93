"""Dispatch against real peers: Debian's Orthanc and DCMTK storescp, with real SR files."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, EnhancedSRStorage, generate_uid
from sqlalchemy import select

from daemon.config import Destination, Settings
from daemon.db import queue
from daemon.db.engine import make_engine
from daemon.db.schema import Base, Dispatch
from daemon.dispatch.job import JOB_KIND, run_dispatch
from daemon.dispatch.scu import (
    CONNECT_FAILED,
    REJECTED,
    SENT,
    echo,
    send_file,
)
from tests.peers import (
    Modality,
    Orthanc,
    RecordingSCP,
    StoreSCP,
    free_port,
    require_dcmtk,
    require_orthanc,
)
from tests.unit.dispatch.dicomfiles import add_dispatch

OUR_AE = "PACSAI"


def _sr_content(source: Dataset) -> hd.sr.MeasurementReport:
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="pacs-ai dispatch test"
        ),
    )
    certainty = hd.sr.Measurement(
        name=hd.sr.CodedConcept("111012", "DCM", "Certainty of finding"),
        value=0.87,
        unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="finding 1"),
        measurements=[certainty],
    )
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
        referenced_images=[source],
    )


@pytest.fixture(scope="module")
def sr_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A TID 1500 report as Comprehensive 3D SR and its Enhanced SR twin; and the study UID."""
    source = dcmread(get_testdata_file("CT_small.dcm"))
    if "PatientWeight" in source and not source.PatientWeight:
        del source.PatientWeight
    content = _sr_content(source)
    common = {
        "evidence": [source],
        "content": content,
        "series_number": 900,
        "instance_number": 1,
        "manufacturer": "pacs-ai tests",
        "series_instance_uid": generate_uid(),
    }
    folder = tmp_path_factory.mktemp("sr")
    main = folder / "report.dcm"
    fallback = folder / "report-enhanced.dcm"
    hd.sr.Comprehensive3DSR(sop_instance_uid=generate_uid(), **common).save_as(main)
    hd.sr.EnhancedSR(sop_instance_uid=generate_uid(), **common).save_as(fallback)
    return main, fallback, str(source.StudyInstanceUID)


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def to_orthanc(pacs: Orthanc, called_ae: str | None = None) -> Destination:
    return Destination(
        name="orthanc", ae_title=called_ae or pacs.aet, host=pacs.host, port=pacs.dicom_port
    )


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    """An Orthanc that knows our AE (and accepts anyone)."""
    require_orthanc()
    with Orthanc(modalities=[Modality(OUR_AE, "127.0.0.1", free_port())]) as pacs:
        yield pacs


def test_report_is_stored_by_orthanc_and_found_by_study(
    orthanc: Orthanc, sr_files: tuple[Path, Path, str]
) -> None:
    main, fallback, study_uid = sr_files
    outcome = send_file(main, fallback, to_orthanc(orthanc), OUR_AE)
    assert outcome.ok and outcome.kind == SENT, outcome.detail
    assert outcome.sop_class_uid == Comprehensive3DSRStorage
    found = orthanc.find_sr(study_uid)
    assert [tags["SOPInstanceUID"] for tags in found] == [uid_of(main)]
    stored = dcmread(io.BytesIO(orthanc.instance_dicom(found[0]["ID"])))
    assert stored.SOPClassUID == Comprehensive3DSRStorage
    assert stored.ContentSequence  # the tree arrived, not just a header


def test_enhanced_sr_goes_to_a_peer_that_only_takes_enhanced(
    sr_files: tuple[Path, Path, str],
) -> None:
    main, fallback, _ = sr_files
    with RecordingSCP([EnhancedSRStorage]) as scp:
        outcome = send_file(
            main,
            fallback,
            Destination(name="old", ae_title=scp.aet, host=scp.host, port=scp.port),
            OUR_AE,
        )
    assert outcome.ok and outcome.fallback_used
    assert scp.received == [(EnhancedSRStorage, uid_of(fallback), OUR_AE)]


def test_orthanc_refusing_our_ae_is_a_named_retryable_rejection(
    sr_files: tuple[Path, Path, str],
) -> None:
    require_orthanc()
    main, fallback, _ = sr_files
    strangers_only = [Modality("SOMEONE", "127.0.0.1", free_port())]
    with Orthanc(modalities=strangers_only, allow_unknown=False) as pacs:
        outcome = send_file(main, fallback, to_orthanc(pacs), OUR_AE)
        assert pacs.instances() == []
    assert outcome.kind == REJECTED
    assert "calling AE title not recognized" in outcome.detail
    assert outcome.retryable


def test_wrong_called_ae_is_a_named_rejection(sr_files: tuple[Path, Path, str]) -> None:
    require_orthanc()
    with Orthanc(check_called_aet=True) as pacs:
        outcome = send_file(sr_files[0], sr_files[1], to_orthanc(pacs, "NOTORTHANC"), OUR_AE)
    assert outcome.kind == REJECTED
    assert "called AE title not recognized" in outcome.detail


def test_orthanc_down_then_back_up(sr_files: tuple[Path, Path, str]) -> None:
    require_orthanc()
    main, fallback, study_uid = sr_files
    with Orthanc() as pacs:
        pacs.stop(kill=True)
        down = send_file(main, fallback, to_orthanc(pacs), OUR_AE)
        assert down.kind == CONNECT_FAILED and down.retryable
        assert f"127.0.0.1:{pacs.dicom_port}" in down.detail
        pacs.start()
        up = send_file(main, fallback, to_orthanc(pacs), OUR_AE)
        assert up.ok, up.detail
        assert len(pacs.find_sr(study_uid)) == 1


def test_echo_against_orthanc_and_a_closed_port(orthanc: Orthanc) -> None:
    ok = echo(to_orthanc(orthanc), OUR_AE)
    assert ok.ok and ok.round_trip_ms is not None
    closed = Destination(name="closed", ae_title="X", host="127.0.0.1", port=free_port())
    failed = echo(closed, OUR_AE)
    assert not failed.ok and failed.kind == CONNECT_FAILED


def test_storescp_receives_the_report(sr_files: tuple[Path, Path, str]) -> None:
    require_dcmtk()
    main, fallback, _ = sr_files
    with StoreSCP() as scp:
        dest = Destination(name="dcmtk", ae_title=scp.aet, host=scp.host, port=scp.port)
        outcome = send_file(main, fallback, dest, OUR_AE)
        assert outcome.ok, outcome.detail
        files = scp.files()
        assert len(files) == 1
        assert dcmread(files[0]).SOPInstanceUID == uid_of(main)


def test_dispatch_job_delivers_to_orthanc(
    orthanc: Orthanc, sr_files: tuple[Path, Path, str], tmp_path: Path
) -> None:
    main, fallback, study_uid = sr_files
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    dispatch_id = add_dispatch(
        engine,
        main,
        fallback,
        destination="orthanc",
        study_uid=study_uid,
        sop_instance_uid=uid_of(main),
    )
    job = queue.claim(engine, "w", [JOB_KIND], lease_seconds=60)
    assert job is not None
    settings = Settings(
        dicom={"ae_title": OUR_AE},
        storage={"spool_dir": str(tmp_path)},
        destinations=[to_orthanc(orthanc).model_dump()],
    )
    run_dispatch(engine, job, settings)
    with engine.connect() as conn:
        state = conn.execute(select(Dispatch.state).where(Dispatch.id == dispatch_id)).scalar_one()
    assert state == "sent"
    assert uid_of(main) in [tags["SOPInstanceUID"] for tags in orthanc.find_sr(study_uid)]
    engine.dispose()
