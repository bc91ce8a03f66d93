"""Delivery verification against a real Orthanc, on SQLite and PostgreSQL.

Orthanc is a Storage Commitment SCP that answers N-ACTION and then opens a NEW
association to the AE it knows as the requestor (its ``DicomModalities`` entry for
PACSAI) to send the N-EVENT-REPORT. Our side of that is a pynetdicom SCP wired the way
the receiver wires it (`add_commitment_context` + `handle_commitment_report`), listening
on the port of that entry. Orthanc also answers C-FIND for the AEs it lists.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from daemon.config import Settings
from daemon.db import queue
from daemon.db.keys import resend_key
from daemon.db.queue import ClaimedJob
from daemon.db.schema import Dispatch, Job
from daemon.dicom.commitment import add_commitment_context
from daemon.dispatch.job import run_dispatch
from daemon.dispatch.verify import VerifyPending, run_verify
from daemon.receive.commitment import handle_commitment_report
from tests.interop.test_dispatch_orthanc import sr_files, uid_of  # noqa: F401 - fixture
from tests.peers import Modality, Orthanc, free_port, require_orthanc
from tests.unit.dispatch.dicomfiles import add_dispatch as dispatch_row

OUR_AE = "PACSAI"
OWNER = "verify-interop"
REPORT_TIMEOUT_S = 15.0


@pytest.fixture(scope="module")
def report_port() -> int:
    """Where Orthanc sends storage commitment reports (our AE's entry in its modalities)."""
    return free_port()


@pytest.fixture(scope="module")
def orthanc(report_port: int) -> Iterator[Orthanc]:
    """An Orthanc that knows our AE at `report_port`: it may store, find and get reports."""
    require_orthanc()
    with Orthanc(modalities=[Modality(OUR_AE, "127.0.0.1", report_port)]) as pacs:
        yield pacs


@pytest.fixture
def receiver(engine: Engine, report_port: int) -> Iterator[None]:
    """Our AE receiving reports, bound as daemon/receive/scp.py binds it."""
    ae = AE(ae_title=OUR_AE)
    ae.require_called_aet = True
    add_commitment_context(ae)
    server = ae.start_server(
        ("127.0.0.1", report_port),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, handle_commitment_report, [engine, 5])],
    )
    yield
    server.shutdown()


def settings_for(orthanc: Orthanc, verify: str, tmp_path: Path) -> Settings:
    return Settings(
        dicom={"ae_title": OUR_AE},
        storage={"spool_dir": str(tmp_path)},
        retry={"max_attempts": 5},
        destinations=[
            {
                "name": "orthanc",
                "ae_title": orthanc.aet,
                "host": orthanc.host,
                "port": orthanc.dicom_port,
                "verify": verify,
            }
        ],
    )


def add_dispatch(engine: Engine, main: Path, fallback: Path, study_uid: str) -> int:
    """The report's study, report and outbox row to Orthanc, and its dispatch job."""
    return dispatch_row(
        engine,
        main,
        fallback,
        destination="orthanc",
        study_uid=study_uid,
        sop_instance_uid=uid_of(main),
    )


def claim(engine: Engine, kind: str) -> ClaimedJob:
    job = queue.claim(engine, OWNER, [kind], lease_seconds=60)
    assert job is not None, f"no {kind} job due"
    return job


def state_of(engine: Engine, dispatch_id: int) -> str:
    with Session(engine) as session:
        return str(session.scalars(select(Dispatch.state).where(Dispatch.id == dispatch_id)).one())


def wait_for_state(engine: Engine, dispatch_id: int, state: str) -> None:
    """Orthanc reports from a job of its own: give it a moment."""
    deadline = time.monotonic() + REPORT_TIMEOUT_S
    while state_of(engine, dispatch_id) != state and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state_of(engine, dispatch_id) == state


def job_states(engine: Engine, kind: str) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(select(Job.state).where(Job.kind == kind).order_by(Job.id)))


def delete_from(orthanc: Orthanc, study_uid: str) -> None:
    """The PACS loses the report (deleted by someone)."""
    for instance in orthanc.find_instances(study_uid, "SR"):
        orthanc.rest(f"/instances/{instance}", method="DELETE")


def test_orthanc_commits_the_report_on_a_new_association(
    orthanc: Orthanc,
    receiver: None,
    engine: Engine,
    sr_files: tuple[Path, Path, str],  # noqa: F811 - the imported fixture
    tmp_path: Path,
) -> None:
    main, fallback, study_uid = sr_files
    delete_from(orthanc, study_uid)  # the module shares one Orthanc
    settings = settings_for(orthanc, "commitment", tmp_path)
    dispatch_id = add_dispatch(engine, main, fallback, study_uid)
    run_dispatch(engine, claim(engine, "dispatch"), settings)
    assert state_of(engine, dispatch_id) == "sent"
    # The N-ACTION goes out; Orthanc's report arrives on its own association meanwhile.
    run_verify(engine, claim(engine, "verify"), settings, report_wait_seconds=3.0)
    wait_for_state(engine, dispatch_id, "confirmed")
    assert job_states(engine, "verify") == ["done"]


def test_orthanc_failure_report_makes_the_report_go_again_and_then_commit(
    orthanc: Orthanc,
    receiver: None,
    engine: Engine,
    sr_files: tuple[Path, Path, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    main, fallback, study_uid = sr_files
    settings = settings_for(orthanc, "commitment", tmp_path)
    dispatch_id = add_dispatch(engine, main, fallback, study_uid)
    run_dispatch(engine, claim(engine, "dispatch"), settings)
    delete_from(orthanc, study_uid)  # stored, then lost before the commitment request
    run_verify(engine, claim(engine, "verify"), settings, report_wait_seconds=3.0)
    wait_for_state(engine, dispatch_id, "pending")
    with Session(engine) as session:
        row = session.get(Dispatch, dispatch_id)
        assert row is not None
        assert "no such object instance" in (row.last_status or "")
        keys = list(session.scalars(select(Job.key).where(Job.kind == "dispatch")))
    assert resend_key(dispatch_id, 1) in keys
    # The resend (same SOP Instance UID) is stored, verified again and committed.
    run_dispatch(engine, claim(engine, "dispatch"), settings)
    assert state_of(engine, dispatch_id) == "sent"
    run_verify(engine, claim(engine, "verify"), settings, report_wait_seconds=3.0)
    wait_for_state(engine, dispatch_id, "confirmed")
    assert [t["SOPInstanceUID"] for t in orthanc.find_sr(study_uid)] == [uid_of(main)]


def test_orthanc_confirms_by_c_find(
    orthanc: Orthanc,
    engine: Engine,
    sr_files: tuple[Path, Path, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    main, fallback, study_uid = sr_files
    settings = settings_for(orthanc, "find", tmp_path)
    dispatch_id = add_dispatch(engine, main, fallback, study_uid)
    run_dispatch(engine, claim(engine, "dispatch"), settings)
    run_verify(engine, claim(engine, "verify"), settings)
    assert state_of(engine, dispatch_id) == "confirmed"
    assert job_states(engine, "verify") == ["done"]


def test_report_orthanc_does_not_list_is_not_confirmed(
    orthanc: Orthanc,
    engine: Engine,
    sr_files: tuple[Path, Path, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    main, fallback, study_uid = sr_files
    settings = settings_for(orthanc, "find", tmp_path)
    dispatch_id = add_dispatch(engine, main, fallback, study_uid)
    run_dispatch(engine, claim(engine, "dispatch"), settings)
    delete_from(orthanc, study_uid)
    with pytest.raises(VerifyPending, match="not found on orthanc"):
        run_verify(engine, claim(engine, "verify"), settings)
    assert state_of(engine, dispatch_id) == "sent"
