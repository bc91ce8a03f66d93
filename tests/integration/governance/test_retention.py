"""Retention: instance files go N days after every destination confirmed the latest SR."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select

from daemon.config import ConfigError, Settings, load_settings
from daemon.db import audit, queue
from daemon.db.schema import AuditEvent, Instance, utcnow
from daemon.retention import purge_due, schedule
from daemon.spool import Spool
from tests.integration.governance import rows

DAY = dt.timedelta(days=1)
DESTINATIONS = [
    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, "verify": "none"},
    {"name": "archive", "ae_title": "ARCH", "host": "127.0.0.1", "port": 105, "verify": "find"},
]


def _settings(spool: Spool, days: float = 30, destinations: list[Any] | None = None) -> Settings:
    return Settings(
        storage={"spool_dir": str(spool.root), "retention_days": days},
        destinations=DESTINATIONS if destinations is None else destinations,
    )


class Reported:
    """A study with three spooled files (one a set-aside older version) and its SR v1."""

    def __init__(self, engine: Engine, spool: Spool) -> None:
        self.study_uid = generate_uid()
        series_uid = generate_uid()
        self.study_id = rows.add_study(engine, self.study_uid, version=2)
        rows.add_series(engine, self.study_id, series_uid)
        sop = generate_uid()
        self.files = [
            rows.add_instance(engine, spool, self.study_uid, series_uid, sop),
            rows.add_instance(engine, spool, self.study_uid, series_uid, sop, superseded=True),
            rows.add_instance(engine, spool, self.study_uid, series_uid, generate_uid()),
        ]
        self.sr_path = spool.report_path(self.study_uid, "1.2.826.0.1.3680043.9.1")
        spool.make_dirs(self.sr_path.parent)
        spool.write_atomic(self.sr_path, b"SR")
        self.report_id = rows.add_report(
            engine, self.study_id, 1, "1.2.826.0.1.3680043.9.1", self.sr_path
        )
        self.cached = spool.cache_path(self.study_uid, f"{series_uid}.cnn-outputs.npz")
        spool.make_dirs(self.cached.parent)
        spool.write_atomic(self.cached, b"outputs")


def _deleted(engine: Engine, study_id: int) -> list[dt.datetime | None]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(Instance.deleted_at).where(Instance.study_id == study_id)).scalars()
        )


def test_files_stay_before_the_retention_time(engine: Engine, spool: Spool) -> None:
    study = Reported(engine, spool)
    sent = utcnow() - 29 * DAY
    rows.add_dispatch(engine, study.report_id, "pacs", "sent", at=sent)
    rows.add_dispatch(engine, study.report_id, "archive", "confirmed", at=sent)
    assert purge_due(engine, spool, _settings(spool)) == []
    assert all(p.is_file() for p in study.files) and study.cached.is_file()
    assert _deleted(engine, study.study_id) == [None, None, None]


def test_files_go_after_the_retention_time_and_the_rows_stay(engine: Engine, spool: Spool) -> None:
    study = Reported(engine, spool)
    sent = utcnow() - 31 * DAY
    rows.add_dispatch(engine, study.report_id, "pacs", "sent", at=sent)
    rows.add_dispatch(engine, study.report_id, "archive", "confirmed", at=sent)
    [purged] = purge_due(engine, spool, _settings(spool))
    assert (purged.study_uid, purged.files) == (study.study_uid, 3)
    assert not any(p.exists() for p in study.files)  # the set-aside older version too
    assert not study.cached.exists()  # outputs derived from those files go with them
    assert study.sr_path.is_file()  # the SR is not an instance: it stays
    deleted = _deleted(engine, study.study_id)
    assert len(deleted) == 3 and all(d is not None for d in deleted)


def test_files_stay_while_one_destination_is_unconfirmed(engine: Engine, spool: Spool) -> None:
    study = Reported(engine, spool)
    long_ago = utcnow() - 365 * DAY
    rows.add_dispatch(engine, study.report_id, "pacs", "sent", at=long_ago)
    rows.add_dispatch(engine, study.report_id, "archive", "sent", at=long_ago)  # verify = find
    assert purge_due(engine, spool, _settings(spool)) == []
    assert all(p.is_file() for p in study.files)


def test_files_stay_while_a_destination_has_no_dispatch_of_the_latest_sr(
    engine: Engine, spool: Spool
) -> None:
    study = Reported(engine, spool)
    rows.add_dispatch(engine, study.report_id, "pacs", "sent", at=utcnow() - 365 * DAY)
    assert purge_due(engine, spool, _settings(spool)) == []
    assert all(p.is_file() for p in study.files)


def test_time_counts_from_the_last_confirmation(engine: Engine, spool: Spool) -> None:
    study = Reported(engine, spool)
    rows.add_dispatch(engine, study.report_id, "pacs", "sent", at=utcnow() - 90 * DAY)
    rows.add_dispatch(engine, study.report_id, "archive", "confirmed", at=utcnow() - 10 * DAY)
    settings = _settings(spool)
    assert purge_due(engine, spool, settings) == []
    assert len(purge_due(engine, spool, settings, now=utcnow() + 21 * DAY)) == 1


def test_only_the_latest_sr_counts(engine: Engine, spool: Spool) -> None:
    study = Reported(engine, spool)
    long_ago = utcnow() - 365 * DAY
    rows.add_dispatch(engine, study.report_id, "pacs", "sent", at=long_ago)
    rows.add_dispatch(engine, study.report_id, "archive", "confirmed", at=long_ago)
    newer = rows.add_report(engine, study.study_id, 2, "1.2.826.0.1.3680043.9.2")
    rows.add_dispatch(engine, newer, "pacs", "pending")
    assert purge_due(engine, spool, _settings(spool)) == []
    assert all(p.is_file() for p in study.files)


def test_files_stay_while_the_study_has_unfinished_work(engine: Engine, spool: Spool) -> None:
    study = Reported(engine, spool)
    long_ago = utcnow() - 365 * DAY
    rows.add_dispatch(engine, study.report_id, "pacs", "sent", at=long_ago)
    rows.add_dispatch(engine, study.report_id, "archive", "confirmed", at=long_ago)
    with engine.begin() as conn:  # a replay waiting to run
        queue.enqueue(conn, "analyse", "analyse:x:v2", max_attempts=1, study_id=study.study_id)
    assert purge_due(engine, spool, _settings(spool)) == []


def test_retention_zero_keeps_files_forever(engine: Engine, spool: Spool) -> None:
    study = Reported(engine, spool)
    long_ago = utcnow() - 3650 * DAY
    rows.add_dispatch(engine, study.report_id, "pacs", "sent", at=long_ago)
    rows.add_dispatch(engine, study.report_id, "archive", "confirmed", at=long_ago)
    assert purge_due(engine, spool, _settings(spool, days=0)) == []


def test_without_destinations_nothing_is_purged(engine: Engine, spool: Spool) -> None:
    study = Reported(engine, spool)
    rows.add_dispatch(engine, study.report_id, "pacs", "sent", at=utcnow() - 365 * DAY)
    assert purge_due(engine, spool, _settings(spool, destinations=[])) == []
    assert all(p.is_file() for p in study.files)


def test_purge_is_audited_with_the_file_count(engine: Engine, spool: Spool) -> None:
    study = Reported(engine, spool)
    long_ago = utcnow() - 365 * DAY
    rows.add_dispatch(engine, study.report_id, "pacs", "sent", at=long_ago)
    rows.add_dispatch(engine, study.report_id, "archive", "confirmed", at=long_ago)
    purge_due(engine, spool, _settings(spool))
    purge_due(engine, spool, _settings(spool))  # nothing left: no second row
    with engine.connect() as conn:
        events = conn.execute(
            select(AuditEvent).where(AuditEvent.event == audit.SPOOL_PURGED)
        ).all()
        assert audit.verify(conn).intact
    assert [(e.study_uid, e.detail["files"]) for e in events] == [(study.study_uid, 3)]


def test_files_already_gone_after_a_crash_are_marked_next_time(
    engine: Engine, spool: Spool
) -> None:
    study = Reported(engine, spool)
    long_ago = utcnow() - 365 * DAY
    rows.add_dispatch(engine, study.report_id, "pacs", "sent", at=long_ago)
    rows.add_dispatch(engine, study.report_id, "archive", "confirmed", at=long_ago)
    study.files[0].unlink()  # removed, then the process died before the rows were marked
    [purged] = purge_due(engine, spool, _settings(spool))
    assert purged.files == 3
    assert all(d is not None for d in _deleted(engine, study.study_id))


def test_files_outside_the_spool_are_left_alone(
    engine: Engine, spool: Spool, tmp_path: Path
) -> None:
    study = Reported(engine, spool)
    stray = tmp_path / "elsewhere.dcm"
    stray.write_bytes(b"x")
    with engine.begin() as conn:
        conn.execute(
            Instance.__table__.update()
            .where(Instance.path == str(study.files[2]))
            .values(path=str(stray))
        )
    long_ago = utcnow() - 365 * DAY
    rows.add_dispatch(engine, study.report_id, "pacs", "sent", at=long_ago)
    rows.add_dispatch(engine, study.report_id, "archive", "confirmed", at=long_ago)
    [purged] = purge_due(engine, spool, _settings(spool))
    assert purged.files == 2
    assert stray.is_file()


@pytest.mark.parametrize(("days", "scheduled"), [(30, True), (0, False)])
def test_the_service_runs_retention_hourly_only_when_configured(
    sqlite_engine: Engine, spool: Spool, days: float, scheduled: bool
) -> None:
    scheduler = BackgroundScheduler(timezone="UTC")
    schedule(scheduler, sqlite_engine, spool, _settings(spool, days=days))
    job = scheduler.get_job("retention")
    assert (job is not None) is scheduled
    if job is not None:
        assert job.trigger.interval == dt.timedelta(hours=1)


def test_retention_days_are_read_from_the_storage_section(tmp_path: Path) -> None:
    path = tmp_path / "pacs-ai.toml"
    path.write_text("[storage]\nretention_days = 90\n")
    assert load_settings(path, environ={}).storage.retention_days == 90
    assert load_settings(None, environ={}).storage.retention_days == 0
    path.write_text("[storage]\nretention_days = -1\n")
    with pytest.raises(ConfigError, match="storage.retention_days"):
        load_settings(path, environ={})
