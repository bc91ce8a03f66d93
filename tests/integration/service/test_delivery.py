"""Delivery as an operator lives it: a PACS that is down, a destination added later, a study
sent twice. One daemon goes through all of it (`_delivery_day`); each test reads one side.

1. The PACS (DCMTK storescp, not yet started) refuses connections: reports wait for retry,
   `status` and `echo` say so without pynetdicom's lines, and the daemon logs one line of
   its own per attempt.
2. The PACS starts: the retries deliver, and the log names the study and instance sent.
3. A second destination is configured (restart) and `reports send --to late` sends the
   study's reports there; sending again sends again. Both are audited.
4. The modality sends the study again: one INFO line says it was all duplicates.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from daemon.db import audit
from daemon.db.engine import make_engine
from daemon.db.schema import AuditEvent, Dispatch, Job
from tests.daemon_proc import Daemon, storescu, wait_for
from tests.interop.conftest import daemon_config
from tests.peers import StoreSCP, require_dcmtk

RETRY_SECONDS = 4  # long enough for `status` to catch a job between two attempts


@dataclasses.dataclass(frozen=True)
class DeliveryDay:
    """What the operator saw at each step, for the tests to check."""

    study_uid: str
    database_url: str
    log: str
    outage_status: subprocess.CompletedProcess
    outage_echo: subprocess.CompletedProcess
    analyse_job: int
    failed_attempts: int
    first_send: subprocess.CompletedProcess
    second_send: subprocess.CompletedProcess
    late_files: int
    reports: int
    job_detail: subprocess.CompletedProcess
    audit_check: subprocess.CompletedProcess


def _dispatches(url: str, destination: str) -> list[Dispatch]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(select(Dispatch).where(Dispatch.destination == destination)).all()
            )
    finally:
        engine.dispose()


def _all_sent(url: str, destination: str, count: int | None = None) -> bool:
    rows = _dispatches(url, destination)
    return bool(rows) and all(r.state == "sent" for r in rows) and count in (None, len(rows))


def _analyse_job(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(Job.id).where(Job.kind == "analyse")).scalar_one())
    finally:
        engine.dispose()


def _status_while_waiting(daemon: Daemon) -> subprocess.CompletedProcess:
    """`pacs-ai status` (with its C-ECHO) at a moment a dispatch waits for its retry."""

    def waiting() -> subprocess.CompletedProcess | None:
        done = daemon.cli("status")
        return done if "waiting for retry (" in done.stdout else None

    return wait_for(waiting, 120, "status showing a dispatch waiting for retry", interval=0.5)


@pytest.fixture(scope="module")
def _delivery_day(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[
    DeliveryDay
]:
    require_dcmtk()
    from models.phantom import write_series

    workdir = tmp_path_factory.mktemp("delivery")
    url = f"sqlite:///{workdir / 'pacs-ai.db'}"
    files = write_series(workdir / "study", slices=4, rows=32, cols=32, lesion=True, seed=3)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with StoreSCP("PACS", workdir=workdir / "pacs") as pacs, StoreSCP(
        "LATE", workdir=workdir / "late"
    ) as late:
        pacs.stop()  # down from the start: connections are refused
        config = daemon_config(
            workdir,
            demo_models,
            database_url=url,
            retry={"base_seconds": RETRY_SECONDS, "cap_seconds": RETRY_SECONDS},
            dicom={"drain_seconds": 2},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": pacs.host,
                           "port": pacs.port}],
        )
        daemon_dir = workdir / "daemon"
        daemon_dir.mkdir()
        with Daemon(daemon_dir, config) as daemon:
            assert storescu(daemon.port, files).returncode == 0
            outage_status = _status_while_waiting(daemon)
            outage_echo = daemon.cli("echo", "pacs")
            pacs.start()
            wait_for(lambda: _all_sent(url, "pacs"), 120, "the reports delivered to pacs")
            reports = len(_dispatches(url, "pacs"))
            failed_attempts = sum(r.attempts for r in _dispatches(url, "pacs")) - reports

        config["destinations"].append(
            {"name": "late", "ae_title": "LATE", "host": late.host, "port": late.port}
        )
        with Daemon(daemon_dir, config) as daemon:
            first_send = daemon.cli("reports", "send", "--to", "late", "--study", study_uid)
            wait_for(lambda: _all_sent(url, "late", reports), 120, "the reports sent to late")
            late_files = len(late.files())
            second_send = daemon.cli("reports", "send", "--to", "late", "--study", study_uid)
            wait_for(
                lambda: all(r.attempts == 2 and r.state == "sent"
                            for r in _dispatches(url, "late")),
                120,
                "the reports sent to late again",
            )
            assert storescu(daemon.port, files).returncode == 0
            wait_for(lambda: "already stored" in daemon.log(), 30, "the duplicates' log line")
            analyse_job = _analyse_job(url)
            job_detail = daemon.cli("jobs", "show", str(analyse_job))
            audit_check = daemon.cli("audit", "verify")
            log = daemon.log()
    yield DeliveryDay(
        study_uid=study_uid,
        database_url=url,
        log=log,
        outage_status=outage_status,
        outage_echo=outage_echo,
        analyse_job=analyse_job,
        failed_attempts=failed_attempts,
        first_send=first_send,
        second_send=second_send,
        late_files=late_files,
        reports=reports,
        job_detail=job_detail,
        audit_check=audit_check,
    )


def test_status_shows_dispatches_waiting_for_retry_with_next_try_and_last_error(
    _delivery_day: DeliveryDay,
) -> None:
    out = _delivery_day.outage_status.stdout
    assert _delivery_day.outage_status.returncode == 0
    assert "waiting for retry)" in out.splitlines()[2]  # beside the oldest queued job
    lines = out.splitlines()
    waiting = lines[lines.index(next(ln for ln in lines if "waiting for retry (" in ln)) + 1]
    assert re.search(r"job \d+ dispatch to pacs: attempt \d+/\d+ failed; next try \S+ \(in \d+ s\)",
                     waiting), waiting
    assert "could not connect to PACS@127.0.0.1" in waiting


def test_a_refused_destination_leaves_no_pynetdicom_lines_on_the_commands_stderr(
    _delivery_day: DeliveryDay,
) -> None:
    assert _delivery_day.outage_status.stderr == ""
    echo = _delivery_day.outage_echo
    assert echo.returncode == 1
    assert echo.stderr == ""
    assert "connect-failed: could not connect to PACS@127.0.0.1" in echo.stdout


def test_each_refused_attempt_is_one_warning_naming_destination_attempt_and_next_try(
    _delivery_day: DeliveryDay,
) -> None:
    log = _delivery_day.log
    failures = [ln for ln in log.splitlines() if "job failed" in ln and "kind=dispatch" in ln]
    assert failures and len(failures) == _delivery_day.failed_attempts
    for line in failures:
        assert " WARNING daemon.worker job failed, will retry " in line, line
        assert re.search(r"destination=pacs attempt=\d+/\d+ next_try=\S+Z error=", line), line
    assert "pynetdicom" not in log


def test_the_dispatch_log_names_the_study_and_instance_it_sent(_delivery_day: DeliveryDay) -> None:
    sent = [ln for ln in _delivery_day.log.splitlines() if "report sent" in ln]
    assert len(sent) == 3 * _delivery_day.reports  # pacs once, late twice
    for line in sent:
        assert f"study={_delivery_day.study_uid}" in line
        assert re.search(r"sop_instance=[0-9.]+ ", line), line


def test_reports_send_delivers_reports_made_before_the_destination_existed(
    _delivery_day: DeliveryDay,
) -> None:
    first = _delivery_day.first_send
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == _delivery_day.reports + 1
    assert all(
        re.fullmatch(rf"study {_delivery_day.study_uid} v1 (SR|heatmap) [0-9.]+: queued "
                     r"\(dispatch \d+\)", ln)
        for ln in lines[:-1]
    ), lines
    assert lines[-1].startswith(f"{_delivery_day.reports} of {_delivery_day.reports} reports")
    assert _delivery_day.late_files == _delivery_day.reports


def test_reports_send_again_sends_again_through_the_outbox(_delivery_day: DeliveryDay) -> None:
    second = _delivery_day.second_send
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("queued again (was sent)") == _delivery_day.reports


def test_every_report_sent_by_an_operator_is_audited(_delivery_day: DeliveryDay) -> None:
    assert _delivery_day.audit_check.returncode == 0, _delivery_day.audit_check.stdout
    engine = make_engine(_delivery_day.database_url)
    try:
        with engine.connect() as conn:
            details = [
                row.detail
                for row in conn.execute(
                    select(AuditEvent).where(AuditEvent.event == audit.REPORT_SEND_REQUESTED)
                ).all()
            ]
    finally:
        engine.dispose()
    assert len(details) == 2 * _delivery_day.reports
    assert {d["destination"] for d in details} == {"late"}


def test_a_study_sent_again_unchanged_is_said_once_in_the_log(_delivery_day: DeliveryDay) -> None:
    lines = [ln for ln in _delivery_day.log.splitlines() if "already stored" in ln]
    assert len(lines) == 1
    assert " INFO daemon.receive.scp " in lines[0]
    assert "instances=4" in lines[0] and "calling_ae=STORESCU" in lines[0]


def test_jobs_show_lists_each_report_kind_path_and_delivery(_delivery_day: DeliveryDay) -> None:
    detail = _delivery_day.job_detail
    assert detail.returncode == 0, detail.stderr
    reports = [ln for ln in detail.stdout.splitlines() if ln.startswith("  report ")]
    assert len(reports) == _delivery_day.reports
    assert any(ln.startswith("  report SR ") for ln in reports)
    assert all(re.search(r" v1 \S*reports/", ln) for ln in reports), reports
    deliveries = [ln.strip() for ln in detail.stdout.splitlines() if ln.startswith("    -> ")]
    assert deliveries.count("-> late: sent after 2 attempt(s): 0x0000 success") == len(reports)
    assert sum(ln.startswith("-> pacs: sent after ") for ln in deliveries) == len(reports)
    as_json = json.loads(
        subprocess.run(
            [*detail.args[:-2], "--json", *detail.args[-2:]], capture_output=True, text=True,
            check=True,
        ).stdout
    )
    assert {d["destination"] for r in as_json["reports"] for d in r["deliveries"]} == {
        "pacs",
        "late",
    }
