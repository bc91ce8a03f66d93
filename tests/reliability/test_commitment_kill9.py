"""SIGKILL between a modality's Storage Commitment N-ACTION and our report: after the
restart the report is still sent, once. On SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from daemon.db.keys import COMMITMENT_REPORT
from daemon.db.schema import CommitmentRequest
from models.phantom import write_series
from tests.conftest import free_port
from tests.daemon_proc import Daemon, wait_for
from tests.interop.conftest import daemon_config
from tests.modality import ModalitySimulator, references
from tests.reliability import harness as h

# A second report, if any, would come within a few retry intervals of the first.
DUPLICATE_WINDOW_S = 4.0


def test_report_is_sent_once_after_a_kill_between_the_request_and_the_report(
    make_daemon: Callable[..., Daemon], database_url: str, tmp_path: Path
) -> None:
    report_port = free_port()
    ct = ModalitySimulator("CT01")  # its SCP is down: the first report cannot go out
    (tmp_path / "no-models").mkdir()
    config = daemon_config(
        tmp_path,
        tmp_path / "no-models",
        database_url=database_url,
        assembly={"quiet_seconds": 3600, "sweep_seconds": 3600},
        workers={"lease_seconds": 10},
        retry={"cap_seconds": 1, "max_attempts": 50},
    )
    config["sources"] = [{"name": "ct1", "ae_title": "CT01", "host": ct.host, "port": report_port}]
    daemon = make_daemon(config).start()
    images = write_series(tmp_path / "study", slices=3, rows=16, cols=16)
    transaction = generate_uid()
    datasets = [dcmread(p) for p in images]
    with ct.associate(daemon.port) as assoc:
        assert ct.store(assoc, datasets) == [0, 0, 0]
        assert ct.request_commitment(assoc, transaction, references(datasets)) == 0
    engine = h.daemon_database(daemon)
    try:
        failed = wait_for(
            lambda: [
                j
                for j in h.jobs(engine, COMMITMENT_REPORT)
                if j.attempts >= 1 and j.state == "queued"
            ],
            30,
            "a failed first report attempt",
        )
        assert "no association" in (failed[0].last_error or "")
        daemon.kill()
        ct.start(report_port)
        try:
            daemon.start(upgrade=False)
            ct.wait_for_report(transaction, 60)
            time.sleep(DUPLICATE_WINDOW_S)
            assert len(ct.reports(transaction)) == 1
            assert ct.reports(transaction)[0].report.success
        finally:
            ct.stop()
        with engine.connect() as conn:
            state = conn.execute(
                select(CommitmentRequest.state).where(
                    CommitmentRequest.transaction_uid == transaction
                )
            ).scalar_one()
        assert state == "reported"
        assert [j.state for j in h.jobs(engine, COMMITMENT_REPORT)] == ["done"]
    finally:
        engine.dispose()
