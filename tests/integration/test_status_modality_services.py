"""`pacs-ai status` says where the modalities' MPPS steps and Storage Commitment requests
stand, from the rows the receiver wrote; on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

from pydicom.uid import CTImageStorage, generate_uid
from sqlalchemy import Engine, select

from daemon.config import Settings
from daemon.db import commitments, mpps
from daemon.db.schema import CommitmentState, MppsStep, utcnow
from daemon.dicom.mpps import COMPLETED, IN_PROGRESS, Performed, StepCreated, StepSet
from daemon.status import collect_status, render_status


def _step(engine: Engine, state: str) -> int:
    """A step created by a modality and left `state`; its row id."""
    uid = generate_uid()
    with engine.begin() as conn:
        mpps.create_step(conn, StepCreated(uid, (generate_uid(),), IN_PROGRESS, Performed()), "CT1")
        if state != IN_PROGRESS:
            mpps.set_step(conn, uid, StepSet(state, Performed((generate_uid(),)), None))
        found = select(MppsStep.id).where(MppsStep.sop_instance_uid == uid)
        return int(conn.execute(found).scalar_one())


def _request(engine: Engine) -> int:
    with engine.begin() as conn:
        request_id, _, _ = commitments.record_request(
            conn, generate_uid(), "CT1", [(CTImageStorage, generate_uid())],
            max_attempts=3, first_attempt_seconds=0,
        )
    return request_id


def test_status_counts_mpps_steps_and_commitment_requests_by_where_they_stand(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    settings = Settings(storage={"spool_dir": str(tmp_path), "database_url": db_url})
    text = render_status(collect_status(settings, echo=False))
    assert "  mpps steps: none" in text and "  storage commitments: none" in text
    _step(engine, IN_PROGRESS)  # its study never came: expired below
    time.sleep(0.01)
    cutoff = utcnow()
    time.sleep(0.01)
    _step(engine, IN_PROGRESS)
    _step(engine, COMPLETED)  # waits for the images it names
    taken = _step(engine, COMPLETED)
    reported = _request(engine)
    _request(engine)
    with engine.begin() as conn:
        mpps.expire(conn, cutoff)
        mpps.mark_taken(conn, [taken], 1)
        commitments.mark(conn, reported, CommitmentState.REPORTED, "0x0000")
    status = collect_status(settings, echo=False)
    assert status["mpps_steps"] == {
        "in progress": 1, "waiting for images": 1, "taken": 1, "expired": 1}
    assert status["storage_commitments"] == {
        "pending": 1, "reported": 1, "dead": 0, "cancelled": 0}
    text = render_status(status)
    assert "  mpps steps: in progress 1   waiting for images 1   taken 1   expired 1" in text
    assert "  storage commitments: pending 1   reported 1   dead 0   cancelled 0" in text
