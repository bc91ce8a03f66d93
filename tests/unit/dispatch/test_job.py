"""The dispatch job: outbox row and job move together, failures are recorded on the row."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import Comprehensive3DSRStorage, EnhancedSRStorage
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from daemon.config import Settings
from daemon.db import queue
from daemon.db.keys import dispatch_key
from daemon.db.queue import ClaimedJob, RetryPolicy
from daemon.db.schema import Dispatch, Job, Report, Study
from daemon.dispatch.job import (
    JOB_KIND,
    DispatchFailed,
    dispatch_id_of,
    mark_dead,
    run_dispatch,
)
from tests.peers import RecordingSCP, free_port
from tests.unit.dispatch.dicomfiles import write_instance

OWNER = "worker-test"


def settings_for(tmp_path: Path, port: int, *, ae_title: str = "RECORDER") -> Settings:
    return Settings(
        dicom={"ae_title": "PACSAI"},
        storage={"spool_dir": str(tmp_path / "spool")},
        destinations=[{"name": "pacs", "ae_title": ae_title, "host": "127.0.0.1", "port": port}],
    )


def add_dispatch(
    engine: Engine, sr_pair: tuple[Path, Path], destination: str = "pacs", state: str = "pending"
) -> int:
    """A study, its report and one outbox row; returns the Dispatch id."""
    with engine.begin() as conn:
        study_id = conn.execute(
            Study.__table__.insert().values(study_uid="1.2.3.4").returning(Study.id)
        ).scalar_one()
        report_id = conn.execute(
            Report.__table__.insert()
            .values(
                study_id=study_id,
                study_version=1,
                sop_instance_uid="1.2.3.4.5",
                sop_class_uid=Comprehensive3DSRStorage,
                path=str(sr_pair[0]),
                fallback_path=str(sr_pair[1]),
            )
            .returning(Report.id)
        ).scalar_one()
        dispatch_id = conn.execute(
            Dispatch.__table__.insert()
            .values(report_id=report_id, destination=destination, state=state)
            .returning(Dispatch.id)
        ).scalar_one()
        queue.enqueue(
            conn,
            JOB_KIND,
            dispatch_key(dispatch_id),
            max_attempts=2,
            payload={"dispatch_id": dispatch_id},
        )
    return int(dispatch_id)


def claim(engine: Engine) -> ClaimedJob:
    job = queue.claim(engine, OWNER, [JOB_KIND], lease_seconds=60)
    assert job is not None
    return job


def dispatch_row(engine: Engine, dispatch_id: int) -> Dispatch:
    with Session(engine) as session:
        row = session.get(Dispatch, dispatch_id)
        assert row is not None
        return row


def job_state(engine: Engine, job_id: int) -> str:
    with engine.connect() as conn:
        return str(conn.execute(select(Job.state).where(Job.id == job_id)).scalar_one())


def test_sent_report_marks_row_sent_and_job_done_together(
    engine: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = add_dispatch(engine, sr_pair)
    job = claim(engine)
    assert dispatch_id_of(job) == dispatch_id
    with RecordingSCP([Comprehensive3DSRStorage, EnhancedSRStorage]) as scp:
        run_dispatch(engine, job, settings_for(tmp_path, scp.port))
    row = dispatch_row(engine, dispatch_id)
    assert row.state == "sent"
    assert row.attempts == 1
    assert row.sent_sop_class_uid == Comprehensive3DSRStorage
    assert row.sent_at is not None
    assert row.last_status == "0x0000 success"
    assert job_state(engine, job.id) == "done"


def test_fallback_class_is_recorded(
    engine: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = add_dispatch(engine, sr_pair)
    with RecordingSCP([EnhancedSRStorage]) as scp:
        run_dispatch(engine, claim(engine), settings_for(tmp_path, scp.port))
    assert dispatch_row(engine, dispatch_id).sent_sop_class_uid == EnhancedSRStorage


def test_relative_report_paths_are_under_the_spool(engine: Engine, tmp_path: Path) -> None:
    reports = tmp_path / "spool" / "reports"
    reports.mkdir(parents=True)
    write_instance(reports / "r.dcm", Comprehensive3DSRStorage)
    write_instance(reports / "r-enhanced.dcm", EnhancedSRStorage)
    dispatch_id = add_dispatch(engine, (Path("reports/r.dcm"), Path("reports/r-enhanced.dcm")))
    with RecordingSCP([Comprehensive3DSRStorage]) as scp:
        run_dispatch(engine, claim(engine), settings_for(tmp_path, scp.port))
    assert dispatch_row(engine, dispatch_id).state == "sent"


def test_missing_report_file_is_permanent(
    engine: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = add_dispatch(engine, (sr_pair[0], tmp_path / "missing.dcm"))
    with RecordingSCP([Comprehensive3DSRStorage]) as scp:
        with pytest.raises(DispatchFailed) as info:
            run_dispatch(engine, claim(engine), settings_for(tmp_path, scp.port))
    assert not info.value.retryable
    assert "missing.dcm" in str(info.value)
    assert scp.received == []
    assert dispatch_row(engine, dispatch_id).attempts == 1


def test_failed_send_records_status_and_leaves_job_to_the_worker(
    engine: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = add_dispatch(engine, sr_pair)
    job = claim(engine)
    with RecordingSCP([Comprehensive3DSRStorage], status=0xA700) as scp:
        with pytest.raises(DispatchFailed) as info:
            run_dispatch(engine, job, settings_for(tmp_path, scp.port))
    assert info.value.retryable
    assert str(info.value) == "pacs: 0xA700 out of resources"
    row = dispatch_row(engine, dispatch_id)
    assert (row.state, row.attempts, row.last_status) == ("pending", 1, "0xA700 out of resources")
    # The worker's part: back to the queue, and after the budget, dead on both sides.
    assert queue.fail(engine, job.id, OWNER, str(info.value), RetryPolicy(base_seconds=0)) == (
        "queued"
    )
    job = claim(engine)
    with pytest.raises(DispatchFailed):
        run_dispatch(engine, job, settings_for(tmp_path, free_port()))
    assert queue.fail(engine, job.id, OWNER, "x", RetryPolicy(base_seconds=0)) == "dead"
    assert mark_dead(engine, dispatch_id, "gave up after 2 attempts")
    row = dispatch_row(engine, dispatch_id)
    assert (row.state, row.attempts) == ("dead", 2)
    assert row.last_status == "gave up after 2 attempts"


def test_mark_dead_leaves_sent_rows_alone(engine: Engine, sr_pair: tuple[Path, Path]) -> None:
    dispatch_id = add_dispatch(engine, sr_pair, state="sent")
    assert not mark_dead(engine, dispatch_id)
    assert dispatch_row(engine, dispatch_id).state == "sent"


def test_already_sent_row_completes_without_sending(
    engine: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    add_dispatch(engine, sr_pair, state="sent")
    job = claim(engine)
    with RecordingSCP([Comprehensive3DSRStorage]) as scp:
        run_dispatch(engine, job, settings_for(tmp_path, scp.port))
    assert scp.received == []
    assert job_state(engine, job.id) == "done"


def test_revived_dead_row_is_sent(
    engine: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = add_dispatch(engine, sr_pair, state="dead")
    with RecordingSCP([Comprehensive3DSRStorage]) as scp:
        run_dispatch(engine, claim(engine), settings_for(tmp_path, scp.port))
    assert dispatch_row(engine, dispatch_id).state == "sent"


def test_unconfigured_destination_is_permanent(
    engine: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = add_dispatch(engine, sr_pair, destination="removed")
    with pytest.raises(DispatchFailed) as info:
        run_dispatch(engine, claim(engine), settings_for(tmp_path, free_port()))
    assert not info.value.retryable
    assert "removed" in str(info.value)
    assert dispatch_row(engine, dispatch_id).attempts == 1


def test_lost_lease_keeps_nothing(
    engine: Engine, sr_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    dispatch_id = add_dispatch(engine, sr_pair)
    job = claim(engine)
    queue.cancel(engine, job.id)
    with RecordingSCP([Comprehensive3DSRStorage]) as scp:
        with pytest.raises(queue.LeaseLost):
            run_dispatch(engine, job, settings_for(tmp_path, scp.port))
    assert dispatch_row(engine, dispatch_id).state == "pending"


def test_payload_without_dispatch_id_is_permanent(engine: Engine, tmp_path: Path) -> None:
    with engine.begin() as conn:
        queue.enqueue(conn, JOB_KIND, "dispatch:bad", max_attempts=1, payload={})
    with pytest.raises(DispatchFailed) as info:
        run_dispatch(engine, claim(engine), settings_for(tmp_path, free_port()))
    assert not info.value.retryable
