"""Retention and Storage Commitment: an instance a modality was told is committed is never
removed before an SR covering it is confirmed (on SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt

from pydicom.uid import generate_uid
from sqlalchemy import Engine, select

from daemon.config import Settings
from daemon.db.schema import Report, utcnow
from daemon.receive.commitment_scp import decide
from daemon.retention import purge_due, purge_study
from daemon.spool import Spool
from tests.integration.governance import rows

LONG_AGO = utcnow() - dt.timedelta(days=31)


def test_committed_instance_stays_until_an_sr_covering_it_is_confirmed(
    engine: Engine, spool: Spool
) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    study_id = rows.add_study(engine, study_uid, version=2)
    rows.add_series(engine, study_id, series_uid)
    reported = rows.add_instance(engine, spool, study_uid, series_uid, generate_uid())
    report_id = rows.add_report(engine, study_id, 1, generate_uid())
    rows.add_dispatch(engine, report_id, "pacs", "sent", at=LONG_AGO)
    late_uid = generate_uid()  # arrived after the SR of version 1: version 2, not analysed
    late = rows.add_instance(engine, spool, study_uid, series_uid, late_uid, study_version=2)
    with engine.connect() as conn:
        told = decide(conn, [(rows.CT, late_uid)])
        report = conn.execute(select(Report).where(Report.id == report_id)).one()
    assert told.committed == ((rows.CT, late_uid),)
    settings = Settings(
        storage={"spool_dir": str(spool.root), "retention_days": 30},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    )
    assert purge_due(engine, spool, settings) == []  # the study waits for its next SR
    assert purge_study(engine, spool, study_id, study_uid, report) == 1  # even forced
    assert late.is_file() and not reported.is_file()
