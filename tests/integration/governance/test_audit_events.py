"""Which events reach the audit trail, and that each carries UIDs and names, never patient data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import EnhancedSRStorage, generate_uid
from sqlalchemy import Engine, select

from daemon.db import audit, queue
from daemon.db.keys import DISPATCH, dispatch_key
from daemon.db.schema import AuditEvent
from daemon.dispatch import job as dispatch_job
from daemon.dispatch.scu import SendOutcome
from daemon.status import operator_cancel, operator_retry
from tests.integration.governance import rows


def _events(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(select(AuditEvent).order_by(AuditEvent.id)).all()


def _dispatch_job(engine: Engine, spool_dir: Path) -> tuple[str, int, int]:
    """A study, its SR v1 and a queued dispatch of it to `pacs`: (study UID, dispatch, job)."""
    study_uid = generate_uid()
    study_id = rows.add_study(engine, study_uid)
    report_id = rows.add_report(engine, study_id, 1, "1.2.826.0.1.3680043.9.7", spool_dir / "x")
    dispatch_id = rows.add_dispatch(engine, report_id, "pacs", "pending")
    with engine.begin() as conn:
        job_id = queue.enqueue(
            conn,
            DISPATCH,
            dispatch_key(dispatch_id),
            max_attempts=1,
            study_id=study_id,
            payload={"dispatch_id": dispatch_id},
        )
    return study_uid, dispatch_id, job_id


def test_operator_cancel_and_retry_are_audited_with_the_job_and_study(
    engine: Engine, db_url: str, spool_dir: Path
) -> None:
    study_uid, _, job_id = _dispatch_job(engine, spool_dir)
    settings = rows.settings_for(db_url, spool_dir)
    assert operator_cancel(settings, job_id)
    assert operator_retry(settings, job_id)
    events = _events(engine)
    assert [(e.event, e.study_uid, e.detail) for e in events] == [
        (audit.JOB_CANCELLED, study_uid, {"job": job_id, "kind": DISPATCH}),
        (audit.JOB_RETRIED, study_uid, {"job": job_id, "kind": DISPATCH}),
    ]


def test_refused_operator_action_is_not_audited(
    engine: Engine, db_url: str, spool_dir: Path
) -> None:
    _, _, job_id = _dispatch_job(engine, spool_dir)
    assert not operator_retry(rows.settings_for(db_url, spool_dir), job_id)  # not dead
    assert _events(engine) == []


def test_delivered_sr_is_audited_with_the_uid_that_went_and_the_destination(
    engine: Engine, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_uid, dispatch_id, _ = _dispatch_job(engine, spool_dir)
    fallback_uid = "1.2.826.0.1.3680043.9.8"
    outcome = SendOutcome(
        ok=True,
        kind="sent",
        detail="0x0000 success",
        retryable=False,
        status=0,
        sop_class_uid=EnhancedSRStorage,
        sop_instance_uid=fallback_uid,
        fallback_used=True,
    )
    monkeypatch.setattr(dispatch_job, "send", lambda *args, **kwargs: outcome)
    settings = rows.settings_for(
        "sqlite://",
        spool_dir,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    )
    claimed = queue.claim(engine, "w", [DISPATCH], lease_seconds=60)
    assert claimed is not None
    dispatch_job.run_dispatch(engine, claimed, settings)
    [event] = _events(engine)
    assert event.event == audit.SR_DELIVERED
    assert event.study_uid == study_uid
    assert event.detail == {
        "sr_uid": fallback_uid,
        "sop_class_uid": EnhancedSRStorage,
        "study_version": 1,
        "destination": "pacs",
        "dispatch": dispatch_id,
    }


def test_failed_delivery_is_not_audited(
    engine: Engine, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dispatch_job(engine, spool_dir)
    outcome = SendOutcome(ok=False, kind="rejected", detail="0xA700", retryable=True)
    monkeypatch.setattr(dispatch_job, "send", lambda *args, **kwargs: outcome)
    settings = rows.settings_for(
        "sqlite://",
        spool_dir,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    )
    claimed = queue.claim(engine, "w", [DISPATCH], lease_seconds=60)
    assert claimed is not None
    with pytest.raises(dispatch_job.DispatchFailed):
        dispatch_job.run_dispatch(engine, claimed, settings)
    assert _events(engine) == []


def test_study_received_is_audited_once_on_both_databases(engine: Engine) -> None:
    with engine.begin() as conn:
        audit.record_studies_received(conn, ["1.2.3"])
    with engine.begin() as conn:
        audit.record_studies_received(conn, ["1.2.3", "1.2.4"])
    assert [(e.event, e.study_uid, e.detail) for e in _events(engine)] == [
        (audit.STUDY_RECEIVED, "1.2.3", {}),
        (audit.STUDY_RECEIVED, "1.2.4", {}),
    ]
