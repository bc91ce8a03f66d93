"""`reports send` chooses each study's latest reports and puts them in the ordinary outbox."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update

from daemon.config import ConfigError
from daemon.db.schema import Dispatch, Job, Report, utcnow
from daemon.resend import NothingToSend, send_reports
from tests.integration.governance.rows import add_dispatch, add_report, add_study, settings_for

DESTINATIONS = [
    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
    {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 105},
]


def _report(engine: Engine, study_id: int, version: int, uid: str, age_days: float) -> int:
    report_id = add_report(engine, study_id, version, uid)
    with engine.begin() as conn:
        conn.execute(
            update(Report)
            .where(Report.id == report_id)
            .values(created_at=utcnow() - dt.timedelta(days=age_days))
        )
    return report_id


def _jobs(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(select(Job.key, Job.state)).all())


def test_since_sends_the_latest_version_of_each_study_reported_since(
    engine: Engine, spool_dir: Path
) -> None:
    settings = settings_for(str(engine.url), spool_dir, destinations=DESTINATIONS)
    old = add_study(engine, "1.2.1")
    _report(engine, old, 1, "2.25.11", age_days=10)
    revised = add_study(engine, "1.2.2", version=2)
    _report(engine, revised, 1, "2.25.21", age_days=3)
    _report(engine, revised, 2, "2.25.22", age_days=0.5)

    since = utcnow() - dt.timedelta(days=1)
    queued = send_reports(engine, settings, "archive", since=since)

    assert [(q.study_uid, q.study_version, q.sop_instance_uid, q.was) for q in queued] == [
        ("1.2.2", 2, "2.25.22", None)
    ]
    assert _jobs(engine) == {f"dispatch:{queued[0].dispatch_id}": "queued"}


def test_a_pending_row_is_left_on_its_way_and_a_sent_one_is_queued_again(
    engine: Engine, spool_dir: Path
) -> None:
    settings = settings_for(str(engine.url), spool_dir, destinations=DESTINATIONS)
    study = add_study(engine, "1.2.3")
    sent = _report(engine, study, 1, "2.25.31", age_days=0)
    pending = _report(engine, study, 1, "2.25.32", age_days=0)
    sent_row = add_dispatch(engine, sent, "pacs", "sent")
    add_dispatch(engine, pending, "pacs", "pending")

    queued = send_reports(engine, settings, "pacs", study_uid="1.2.3")

    assert [(q.sop_instance_uid, q.was) for q in queued] == [
        ("2.25.31", "sent"),
        ("2.25.32", "pending"),
    ]
    with engine.connect() as conn:
        states = dict(conn.execute(select(Dispatch.id, Dispatch.state)).all())
    assert states[sent_row] == "pending"
    assert _jobs(engine) == {f"dispatch:{sent_row}": "queued"}  # the pending row kept its own


def test_an_unknown_destination_or_nothing_to_send_is_refused(
    engine: Engine, spool_dir: Path
) -> None:
    settings = settings_for(str(engine.url), spool_dir, destinations=DESTINATIONS)
    with pytest.raises(ConfigError, match="no destination named 'nowhere'"):
        send_reports(engine, settings, "nowhere", study_uid="1.2.3")
    with pytest.raises(NothingToSend, match="no reports for study 9.9.9"):
        send_reports(engine, settings, "pacs", study_uid="9.9.9")
