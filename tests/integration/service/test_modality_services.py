"""`pacs-ai serve` with a modality that speaks MPPS and Storage Commitment, on SQLite and
PostgreSQL: the study its MPPS completes closes at once, one without MPPS by its images'
evidence, and `pacs-ai jobs show` says which; the modality's commitment request is
reported on an association the daemon opens to it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select

from daemon.db.engine import make_engine
from daemon.db.schema import Job
from models.phantom import write_series
from tests.daemon_proc import Daemon, wait_for
from tests.interop.conftest import daemon_config
from tests.modality import (
    ModalitySimulator,
    mpps_create_attributes,
    mpps_set_attributes,
    performed,
    references,
)

REPORT_TIMEOUT = 20.0


def phantom(tmp_path: Path, slices: int = 4) -> list[Dataset]:
    study_uid = generate_uid()
    paths = write_series(
        tmp_path / study_uid,
        slices=slices,
        rows=16,
        cols=16,
        study_uid=study_uid,
        series_uid=generate_uid(),
    )
    return [dcmread(p) for p in paths]


def analyse_job(engine: Engine, study_uid: str) -> int:
    """The id of the study's analyse job, once it exists."""

    def find() -> int | None:
        with engine.connect() as conn:
            return conn.execute(
                select(Job.id).where(Job.kind == "analyse", Job.key.contains(study_uid))
            ).scalar_one_or_none()

    return int(wait_for(find, REPORT_TIMEOUT, f"the analyse job of {study_uid}"))


def test_mpps_evidence_and_commitment_through_a_running_daemon(
    make_daemon: Callable[..., Daemon], database_url: str, tmp_path: Path
) -> None:
    with ModalitySimulator("CT01") as ct:
        (tmp_path / "no-models").mkdir()
        config = daemon_config(
            tmp_path,
            tmp_path / "no-models",
            database_url=database_url,
            assembly={"quiet_seconds": 3600, "evidence_seconds": 0.5, "sweep_seconds": 3600},
            workers={"count": 0},
        )
        config["sources"] = [{"name": "ct1", "ae_title": "CT01", "host": ct.host, "port": ct.port}]
        daemon = make_daemon(config).start()
        by_mpps, by_evidence = phantom(tmp_path), phantom(tmp_path)
        study_uid = str(by_mpps[0].StudyInstanceUID)
        step, transaction = generate_uid(), generate_uid()
        with ct.associate(daemon.port) as assoc:
            assert ct.mpps_create(assoc, step, mpps_create_attributes(study_uid)) == 0
            assert ct.store(assoc, by_mpps) == [0] * 4
            done = mpps_set_attributes("COMPLETED", performed(by_mpps))
            assert ct.mpps_set(assoc, step, done) == 0
            assert ct.store(assoc, by_evidence) == [0] * 4
            assert ct.request_commitment(assoc, transaction, references(by_mpps)) == 0
        report = ct.wait_for_report(transaction, REPORT_TIMEOUT)
        assert report.report.success and not report.same_association
        engine = make_engine(database_url)
        try:
            mpps_job = analyse_job(engine, study_uid)
            evidence_job = analyse_job(engine, str(by_evidence[0].StudyInstanceUID))
        finally:
            engine.dispose()
        shown = daemon.cli_json("jobs", "show", str(mpps_job))
        assert (shown["closed_by"], shown["closed_detail"]) == ("mpps", {"mpps": [step]})
        assert "closed_by: evidence" in daemon.cli("jobs", "show", str(evidence_job)).stdout
    log = daemon.log()
    assert f"study={study_uid}" in log and "reason=mpps" in log and "reason=evidence" in log
    assert "commitment reported" in log
