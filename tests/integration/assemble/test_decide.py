"""When a study is done: the modality's MPPS, the images' evidence, the quiet window, the
sweep; each closed version names its reason. Real files in a spool, stored by the
receiver's ingest, on SQLite and PostgreSQL (the `engine` fixture)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import Engine, select

from daemon.assemble import Assembler, Waits, decide, rules, timers
from daemon.assemble.versions import queue_early
from daemon.config import Settings
from daemon.db import mpps
from daemon.db.schema import ClosedVersion, Job, MppsStep, Study
from daemon.dicom.mpps import Performed, PerformedImage, StepCreated, StepSet
from daemon.receive.ingest import Ingestor, Request
from daemon.report.completion import Completion
from daemon.spool import Spool
from models.phantom import write_series

NEVER = 3600.0
MPPS_ONLY = Waits(quiet=NEVER, evidence=None, max_attempts=3)
EVIDENCE = Waits(quiet=NEVER, evidence=0.01, max_attempts=3)
QUIET_NOW = Waits(quiet=0.0, evidence=None, max_attempts=3)


@pytest.fixture
def ingestor(engine: Engine, spool_dir: Path) -> Iterator[Ingestor]:
    spool = Spool(spool_dir)
    spool.prepare()
    ingestor = Ingestor(spool, engine, min_free_bytes=0)
    yield ingestor
    ingestor.close()


def series(tmp_path: Path, study_uid: str, slices: int = 4) -> list[Path]:
    """A phantom CT series (InstanceNumber 1..N, evenly spaced slices) of the study."""
    out = tmp_path / generate_uid()
    return write_series(
        out, slices=slices, rows=16, cols=16, study_uid=study_uid, series_uid=generate_uid()
    )


def store(ingestor: Ingestor, paths: list[Path]) -> None:
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        answer = ingestor.store(
            Request(
                data=path.read_bytes(),
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                transfer_syntax_uid=ExplicitVRLittleEndian,
                calling_ae="CT01",
                peer="127.0.0.1:1",
            )
        )
        assert answer.Status == 0


def images(paths: list[Path]) -> Performed:
    found = [dcmread(p, stop_before_pixels=True) for p in paths]
    return Performed(
        tuple(dict.fromkeys(str(ds.SeriesInstanceUID) for ds in found)),
        tuple(
            PerformedImage(str(ds.SeriesInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID))
            for ds in found
        ),
    )


def start_step(engine: Engine, *studies: str) -> str:
    uid = generate_uid()
    with engine.begin() as conn:
        assert mpps.create_step(conn, StepCreated(uid, studies, "IN PROGRESS", Performed()), "CT01")
    return uid


def end_step(
    engine: Engine, uid: str, state: str, done: Performed, reason: str | None = None
) -> None:
    with engine.begin() as conn:
        outcome, _ = mpps.set_step(conn, uid, StepSet(state, done, reason))
    assert outcome == mpps.SetOutcome.APPLIED


def closed(engine: Engine, study_uid: str) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(ClosedVersion)
                .join(Study, Study.id == ClosedVersion.study_id)
                .where(Study.study_uid == study_uid)
                .order_by(ClosedVersion.version)
            ).all()
        )


def step_row(engine: Engine, uid: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(MppsStep).where(MppsStep.sop_instance_uid == uid)).one()


def test_ended_step_closes_the_study_at_once_when_every_image_is_here(
    engine: Engine, ingestor: Ingestor, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    step = start_step(engine, study_uid)
    paths = series(tmp_path, study_uid)
    store(ingestor, paths)
    assert decide(engine, MPPS_ONLY, study_uid) is None  # still IN PROGRESS
    end_step(engine, step, "COMPLETED", images(paths))
    assert decide(engine, MPPS_ONLY, study_uid) == "mpps"
    (version,) = closed(engine, study_uid)
    assert (version.version, version.reason, version.detail) == (1, "mpps", {"mpps": [step]})
    assert step_row(engine, step).closed_version == 1
    assert Completion.from_detail(version.detail) == Completion()


def test_missing_images_wait_for_the_quiet_window_and_the_sr_names_the_series(
    engine: Engine, ingestor: Ingestor, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    step = start_step(engine, study_uid)
    paths = series(tmp_path, study_uid, slices=5)
    store(ingestor, paths[:4])
    end_step(engine, step, "COMPLETED", images(paths))
    assert decide(engine, MPPS_ONLY, study_uid) is None
    assert decide(engine, QUIET_NOW, study_uid) == "quiet"
    (version,) = closed(engine, study_uid)
    series_uid = str(dcmread(paths[0]).SeriesInstanceUID)
    assert version.detail["incomplete_series"] == [
        {"series": series_uid, "arrived": 4, "expected": 5}
    ]
    completion = Completion.from_detail(version.detail)
    assert completion.partial and series_uid in completion.notes[0]
    store(ingestor, paths[4:])  # the late one opens version 2; the step is not asked again
    assert decide(engine, MPPS_ONLY, study_uid) is None
    assert decide(engine, QUIET_NOW, study_uid) == "quiet"
    assert [(v.version, v.detail) for v in closed(engine, study_uid)][1] == (2, {})


def grouped_step(
    engine: Engine, ingestor: Ingestor, tmp_path: Path
) -> tuple[str, str, str, list[Path]]:
    """(scheduled study, study made, step, its stored images): PS3.17 J.4 lets a modality
    give a grouped procedure's images a Study Instance UID the step does not name."""
    scheduled, made = generate_uid(), generate_uid()
    step = start_step(engine, scheduled)
    paths = series(tmp_path, made)
    store(ingestor, paths)
    return scheduled, made, step, paths


def test_a_step_closes_the_study_its_series_are_in_when_the_images_carry_another_uid(
    engine: Engine, ingestor: Ingestor, tmp_path: Path
) -> None:
    scheduled, made, step, paths = grouped_step(engine, ingestor, tmp_path)
    end_step(engine, step, "COMPLETED", images(paths))
    with engine.connect() as conn:
        assert mpps.studies_of(conn, step_row(engine, step).id) == sorted([scheduled, made])
        assert mpps.studies_with_ended_steps(conn) == sorted([scheduled, made])
    assert decide(engine, MPPS_ONLY, scheduled) is None  # nothing of it ever came
    assert decide(engine, MPPS_ONLY, made) == "mpps"
    assert [(v.version, v.detail) for v in closed(engine, made)] == [(1, {"mpps": [step]})]
    assert step_row(engine, step).closed_version == 1
    with engine.connect() as conn:
        assert mpps.studies_with_ended_steps(conn) == []


def test_a_step_scheduled_for_two_studies_holds_either_while_in_progress_and_closes_it(
    engine: Engine, ingestor: Ingestor, tmp_path: Path
) -> None:
    first, second = generate_uid(), generate_uid()
    step = start_step(engine, first, second)
    paths = series(tmp_path, second)  # the modality chose the second study's UID
    store(ingestor, paths)
    time.sleep(0.02)
    assert decide(engine, EVIDENCE, second) is None
    end_step(engine, step, "COMPLETED", images(paths))
    with engine.connect() as conn:
        assert mpps.studies_of(conn, step_row(engine, step).id) == sorted([first, second])
    assert decide(engine, EVIDENCE, second) == "mpps"


def test_a_step_naming_its_series_while_in_progress_holds_evidence_back_in_their_study(
    engine: Engine, ingestor: Ingestor, tmp_path: Path
) -> None:
    _, made, step, paths = grouped_step(engine, ingestor, tmp_path)
    end_step(engine, step, "IN PROGRESS", images(paths))
    time.sleep(0.02)
    assert decide(engine, EVIDENCE, made) is None
    end_step(engine, step, "COMPLETED", images(paths))
    assert decide(engine, EVIDENCE, made) == "mpps"


def test_discontinued_step_closes_with_what_arrived_and_says_so(
    engine: Engine, ingestor: Ingestor, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    step = start_step(engine, study_uid)
    paths = series(tmp_path, study_uid, slices=6)
    store(ingestor, paths[:2])
    end_step(engine, step, "DISCONTINUED", images(paths[:2]), "Patient refused")
    assert decide(engine, MPPS_ONLY, study_uid) == "mpps"
    (version,) = closed(engine, study_uid)
    assert version.detail["discontinued"] == [{"step": step, "reason": "Patient refused"}]
    assert "discontinued" in Completion.from_detail(version.detail).notes[0]


def test_series_complete_by_evidence_closes_after_the_evidence_pause(
    engine: Engine, ingestor: Ingestor, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    store(ingestor, series(tmp_path, study_uid) + series(tmp_path, study_uid, slices=3))
    assert decide(engine, Waits(quiet=NEVER, evidence=NEVER - 1, max_attempts=3), study_uid) is None
    time.sleep(0.02)
    assert decide(engine, EVIDENCE, study_uid) == "evidence"
    (version,) = closed(engine, study_uid)
    assert sorted(version.detail["evidence"].values()) == [
        "InstanceNumber 1..3, even spacing",
        "InstanceNumber 1..4, even spacing",
    ]


def test_gap_in_a_series_falls_back_to_the_quiet_window(
    engine: Engine, ingestor: Ingestor, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    paths = series(tmp_path, study_uid, slices=4)
    store(ingestor, [paths[0], paths[1], paths[3]])
    time.sleep(0.02)
    assert decide(engine, EVIDENCE, study_uid) is None
    assert decide(engine, QUIET_NOW, study_uid) == "quiet"


def test_step_in_progress_holds_evidence_back(
    engine: Engine, ingestor: Ingestor, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    start_step(engine, study_uid)
    store(ingestor, series(tmp_path, study_uid))
    time.sleep(0.02)
    assert decide(engine, EVIDENCE, study_uid) is None


def test_step_ending_after_its_study_closed_is_taken_without_a_new_version(
    engine: Engine, ingestor: Ingestor, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    step = start_step(engine, study_uid)
    paths = series(tmp_path, study_uid)
    store(ingestor, paths)
    assert decide(engine, QUIET_NOW, study_uid) == "quiet"
    end_step(engine, step, "COMPLETED", images(paths))
    assert decide(engine, MPPS_ONLY, study_uid) is None
    assert step_row(engine, step).closed_version == 1
    assert len(closed(engine, study_uid)) == 1


def test_sweep_closes_what_timers_lost_and_expires_steps_of_studies_that_never_came(
    engine: Engine, ingestor: Ingestor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    quiet_study, ended_study, absent_study = generate_uid(), generate_uid(), generate_uid()
    store(ingestor, series(tmp_path, quiet_study))
    step = start_step(engine, ended_study)
    paths = series(tmp_path, ended_study)
    store(ingestor, paths)
    end_step(engine, step, "COMPLETED", images(paths))
    time.sleep(0.05)
    lost = start_step(engine, absent_study)
    settings = Settings(
        assembly={"quiet_seconds": 0.02, "mpps_expire_hours": 0.01 / 3600},
        storage={"spool_dir": str(tmp_path)},
    )
    time.sleep(0.05)
    assembler = Assembler(engine, settings, BackgroundScheduler())
    with caplog.at_level(logging.WARNING):
        assert assembler.sweep() == 2
    assert [v.reason for v in closed(engine, quiet_study)] == ["sweep"]
    assert [v.reason for v in closed(engine, ended_study)] == ["mpps"]
    assert step_row(engine, lost).expired_at is not None
    expired = [r for r in caplog.records if "expired" in r.getMessage()]
    assert len(expired) == 1 and expired[0].kv["step"] == lost  # type: ignore[attr-defined]


def embed_payloads(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(Job.key, Job.payload).where(Job.kind == "embed")).all())


def test_cnns_keep_pace_with_a_study_whose_mpps_step_is_in_progress(
    engine: Engine, ingestor: Ingestor, tmp_path: Path
) -> None:
    without, with_step = generate_uid(), generate_uid()
    store(ingestor, series(tmp_path, without))
    start_step(engine, with_step)
    store(ingestor, series(tmp_path, with_step))
    assert not queue_early(engine, without, 0.5, 3, arriving=True)
    assert queue_early(engine, with_step, 0.5, 3, arriving=True)
    assert embed_payloads(engine) == {
        f"embed:{with_step}:v1:n4:arriving":
            {"study_uid": with_step, "study_version": 1, "arriving": True},
    }


def test_cnns_keep_pace_with_any_study_while_the_evidence_rule_may_close_it(
    engine: Engine, ingestor: Ingestor, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    store(ingestor, series(tmp_path, study_uid))
    assert queue_early(engine, study_uid, 0.5, 3, arriving=True, any_study=True)
    time.sleep(0.05)
    # The whole early run after the pause is its own job beside the pass at the same count.
    assert queue_early(engine, study_uid, 0.01, 3)
    assert embed_payloads(engine) == {
        f"embed:{study_uid}:v1:n4:arriving":
            {"study_uid": study_uid, "study_version": 1, "arriving": True},
        f"embed:{study_uid}:v1:n4": {"study_uid": study_uid, "study_version": 1},
    }


def test_an_instance_arriving_while_the_rules_look_keeps_the_version_open(
    engine: Engine, ingestor: Ingestor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_uid = generate_uid()
    paths = series(tmp_path, study_uid, slices=5)
    store(ingestor, paths[:4])
    time.sleep(0.02)
    looked = rules.evidence_of

    def arrival_meanwhile(engine: Engine, snap: Any) -> Any:
        store(ingestor, paths[4:])
        return looked(engine, snap)

    monkeypatch.setattr(rules, "evidence_of", arrival_meanwhile)
    assert decide(engine, EVIDENCE, study_uid) is None
    assert closed(engine, study_uid) == []


def test_a_step_ending_while_its_study_is_being_decided_closes_it_right_after(
    engine: Engine, ingestor: Ingestor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """APScheduler skips a timer whose earlier run is still going: the decision asked for
    by the step's end must still be made (not left to the quiet window)."""
    study_uid = generate_uid()
    step = start_step(engine, study_uid)
    paths = series(tmp_path, study_uid)
    store(ingestor, paths)
    settings = Settings(
        assembly={"quiet_seconds": NEVER, "evidence_seconds": 0, "early_seconds": 0},
        storage={"spool_dir": str(tmp_path)},
    )
    scheduler = BackgroundScheduler()
    assembler = Assembler(engine, settings, scheduler)
    decided = timers.decide
    first = threading.Event()

    def step_ends_meanwhile(engine: Engine, waits: Waits, uid: str) -> Any:
        reason = decided(engine, waits, uid)
        if not first.is_set():  # the first decision saw the step IN PROGRESS; still going
            first.set()
            end_step(engine, step, "COMPLETED", images(paths))
            assembler.arrived(study_uid)  # as the MPPS receiver does
            time.sleep(10 * timers.SETTLE_SECONDS)  # the step's own timer fires meanwhile
        return reason

    monkeypatch.setattr(timers, "decide", step_ends_meanwhile)
    scheduler.start()
    try:
        assembler.arrived(study_uid)
        deadline = time.monotonic() + 5.0
        while not closed(engine, study_uid) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        scheduler.shutdown()
    assert first.is_set()
    assert [v.reason for v in closed(engine, study_uid)] == ["mpps"]
