"""An SR plan's fingerprint: the key under which an early run's SR waits for the report job,
so it must change with every input that changes the SR, and with nothing else."""

from __future__ import annotations

import dataclasses

import pytest

from daemon.report.inputs import SeriesFailure
from daemon.report.job import SrPlan
from tests.unit.report.studies import DEVICE, ct_series, image_finding, series_finding


@pytest.fixture
def plan() -> SrPlan:
    study = ct_series(3)
    return SrPlan(
        study_uid=str(study[0].StudyInstanceUID),
        version=1,
        findings=(image_finding(study[0]), series_finding(study)),
        failures=(),
        sources=tuple(
            (str(ds.SOPInstanceUID), f"{n:064x}", f"/spool/{n}.dcm") for n, ds in enumerate(study)
        ),
        previous=(),
        series_number=7701,
        device=DEVICE,
    )


def test_the_same_inputs_give_the_same_fingerprint_wherever_the_files_are(plan: SrPlan) -> None:
    moved = dataclasses.replace(
        plan, sources=tuple((uid, sha, f"/elsewhere{path}") for uid, sha, path in plan.sources)
    )
    assert moved.fingerprint() == plan.fingerprint()
    assert dataclasses.replace(plan).fingerprint() == plan.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        "probability",
        "source bytes",
        "superseded report",
        "failure",
        "version",
        "series number",
    ],
)
def test_any_input_of_the_sr_changes_the_fingerprint(plan: SrPlan, change: str) -> None:
    first, *rest = plan.findings
    changed = {
        "probability": lambda: dataclasses.replace(
            plan, findings=(dataclasses.replace(first, probability=0.86), *rest)
        ),
        "source bytes": lambda: dataclasses.replace(
            plan, sources=(("1.2.3", "f" * 64, "/spool/0.dcm"), *plan.sources[1:])
        ),
        "superseded report": lambda: dataclasses.replace(plan, previous=(("1.2.9", "/r.dcm"),)),
        "failure": lambda: dataclasses.replace(
            plan, failures=(SeriesFailure("1.2.4", "chest-cnn", "ValueError: bad"),)
        ),
        "version": lambda: dataclasses.replace(plan, version=2),
        "series number": lambda: dataclasses.replace(plan, series_number=7702),
    }[change]()
    assert changed.fingerprint() != plan.fingerprint()


def test_the_sr_uid_is_the_one_the_report_job_would_give(plan: SrPlan) -> None:
    from daemon.report.uids import sr_uid

    keys = [f.model_key for f in plan.findings]
    assert plan.sop_instance_uid == sr_uid(plan.study_uid, 1, keys)
