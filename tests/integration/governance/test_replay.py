"""Replay: a spooled study is analysed again (by one model, if named) and its SR supersedes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine, select, update

from daemon import analyse
from daemon.assemble import Waits, decide
from daemon.cli import main
from daemon.config import Settings
from daemon.context import WorkerContext
from daemon.db import audit, queue
from daemon.db.keys import ANALYSE, REPORT, analyse_key
from daemon.db.schema import AuditEvent, Instance, Job, Result, Study, utcnow
from daemon.governance import ReplayRefused, replay
from daemon.spool import Spool
from tests.integration.governance import fakes, rows

OWNER = "worker-test"


def _spooled_study(engine: Engine, spool: Spool, *, version: int = 2) -> str:
    """A study analysed once (version 1 closed, version 2 open) with two spooled instances."""
    study_uid = generate_uid()
    series_uid = generate_uid()
    study_id = rows.add_study(engine, study_uid, version=version)
    rows.add_series(engine, study_id, series_uid)
    for _ in range(2):
        rows.add_instance(engine, spool, study_uid, series_uid, generate_uid())
    return study_uid


def _study(engine: Engine, study_uid: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(Study).where(Study.study_uid == study_uid)).one()


def _job(engine: Engine, key: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(Job).where(Job.key == key)).one()


def _events(engine: Engine, event: str) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(
            select(AuditEvent).where(AuditEvent.event == event).order_by(AuditEvent.id)
        ).all()


def test_replay_queues_the_open_version_for_the_named_model_and_bumps_the_version(
    engine: Engine, spool: Spool
) -> None:
    study_uid = _spooled_study(engine, spool)
    queued = replay(engine, study_uid, max_attempts=3, models=["cnn-b"])
    assert queued.study_version == 2
    job = _job(engine, analyse_key(study_uid, 2))
    assert (job.id, job.kind, job.state) == (queued.job_id, ANALYSE, "queued")
    assert job.payload == {"study_uid": study_uid, "study_version": 2, "models": ["cnn-b"]}
    assert _study(engine, study_uid).version == 3


def test_replay_without_a_model_runs_every_model(engine: Engine, spool: Spool) -> None:
    study_uid = _spooled_study(engine, spool)
    replay(engine, study_uid, max_attempts=3)
    assert "models" not in _job(engine, analyse_key(study_uid, 2)).payload


def test_replay_neither_waits_for_quiet_nor_needs_a_new_instance(
    engine: Engine, spool: Spool
) -> None:
    study_uid = _spooled_study(engine, spool, version=2)  # instances all in version 1
    assert not decide(engine, Waits(quiet=3600, evidence=None, max_attempts=3), study_uid)
    replay(engine, study_uid, max_attempts=3)
    replay(engine, study_uid, max_attempts=3)
    assert _study(engine, study_uid).version == 4


def test_quiet_study_is_still_closed_by_the_timer(engine: Engine, spool: Spool) -> None:
    study_uid = _spooled_study(engine, spool, version=1)
    assert decide(engine, Waits(quiet=0, evidence=None, max_attempts=3), study_uid)
    assert _job(engine, analyse_key(study_uid, 1)).payload == {
        "study_uid": study_uid,
        "study_version": 1,
    }
    assert _study(engine, study_uid).version == 2


def test_replay_is_audited(engine: Engine, spool: Spool) -> None:
    study_uid = _spooled_study(engine, spool)
    queued = replay(engine, study_uid, max_attempts=3, models=["cnn-b"])
    [event] = _events(engine, audit.REPLAY_REQUESTED)
    assert event.study_uid == study_uid
    assert event.detail == {"study_version": 2, "job": queued.job_id, "models": ["cnn-b"]}


def test_unknown_study_is_refused(engine: Engine) -> None:
    with pytest.raises(ReplayRefused, match="no such study"):
        replay(engine, "1.2.3.999", max_attempts=3)
    assert _events(engine, audit.REPLAY_REQUESTED) == []


def test_unknown_model_is_refused_before_anything_is_queued(engine: Engine, spool: Spool) -> None:
    study_uid = _spooled_study(engine, spool)
    with pytest.raises(ReplayRefused, match="no model named 'nope'"):
        replay(engine, study_uid, max_attempts=3, models=["nope"], known={"cnn-a"})
    assert _study(engine, study_uid).version == 2


def test_purged_study_is_refused(engine: Engine, spool: Spool) -> None:
    study_uid = _spooled_study(engine, spool)
    with engine.begin() as conn:
        conn.execute(update(Instance).values(deleted_at=utcnow()))
    with pytest.raises(ReplayRefused, match="purged"):
        replay(engine, study_uid, max_attempts=3)


def test_replay_command_names_an_unknown_study_in_one_line_and_fails(
    db_url: str,
    engine: Engine,
    config_file: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["replay", "1.2.3.999", "--config", str(config_file(db_url))])
    err = capsys.readouterr().err
    assert code == 1
    assert err == "pacs-ai: study 1.2.3.999: no such study\n"


def test_replay_command_queues_the_study(
    db_url: str,
    engine: Engine,
    spool: Spool,
    config_file: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    study_uid = _spooled_study(engine, spool)
    assert main(["replay", study_uid, "--config", str(config_file(db_url))]) == 0
    assert f"study {study_uid}: version 2 queued for analysis" in capsys.readouterr().out


# The replayed analyse job -------------------------------------------------------------


def _fake_analysis(calls: list[Any]) -> Callable[..., list[dict[str, Any]]]:
    """Every model the (restricted) registry holds scores the series; records what it got."""

    def run(
        series: Any,
        registry: Any,
        metrics: Any,
        shadow: frozenset[str],
        heatmaps: Any = None,
        cache: Any = None,
    ) -> list[dict]:
        calls.append((registry, shadow))
        out = []
        for model in (*registry.cnns, *registry.lstms):
            out.append(
                {
                    "series_uid": series.series_uid,
                    "model_name": model.name,
                    "model_version": "1.0",
                    "weights_sha256": model.manifest.weights_sha256,
                    "level": "image" if model.manifest.kind == "cnn" else "series",
                    "label": "nodule",
                    "probability": 0.5,
                    "detail": {"shadow": model.name in shadow},
                }
            )
        return out

    return run


def _run_queued_analysis(
    engine: Engine, spool: Spool, settings: Settings, registry: fakes.FakeRegistry
) -> queue.ClaimedJob:
    job = queue.claim(engine, OWNER, [ANALYSE], lease_seconds=60)
    assert job is not None
    ctx = WorkerContext(
        settings=settings, engine=engine, spool=spool, owner=OWNER, registry=registry
    )
    analyse.run_analyse(ctx, job)
    return job


def _registry() -> fakes.FakeRegistry:
    return fakes.FakeRegistry(
        (fakes.loaded(fakes.manifest("cnn-a")), fakes.loaded(fakes.manifest("cnn-b"))),
        (fakes.loaded(fakes.manifest("lstm-a", kind="lstm", cnn="cnn-a")),),
    )


def _models_of(engine: Engine, job_id: int) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(Result.model_name).where(Result.job_id == job_id)).scalars())


def test_replayed_analysis_runs_only_the_named_model(
    engine: Engine, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_uid = _spooled_study(engine, spool)
    replay(engine, study_uid, max_attempts=3, models=["cnn-b"])
    calls: list[Any] = []
    monkeypatch.setattr(analyse, "analyse_one_series", _fake_analysis(calls))
    settings = Settings(storage={"spool_dir": str(spool.root)})
    job = _run_queued_analysis(engine, spool, settings, _registry())
    assert [m.name for m in calls[0][0].cnns] == ["cnn-b"]
    assert _models_of(engine, job.id) == {"cnn-b"}
    assert _job(engine, f"{REPORT}:{study_uid}:v2").state == "queued"


def test_named_lstm_runs_on_its_cnn_but_only_its_results_are_kept(
    engine: Engine, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_uid = _spooled_study(engine, spool)
    replay(engine, study_uid, max_attempts=3, models=["lstm-a"])
    calls: list[Any] = []
    monkeypatch.setattr(analyse, "analyse_one_series", _fake_analysis(calls))
    settings = Settings(storage={"spool_dir": str(spool.root)})
    job = _run_queued_analysis(engine, spool, settings, _registry())
    registry = calls[0][0]
    assert ([m.name for m in registry.cnns], [m.name for m in registry.lstms]) == (
        ["cnn-a"],
        ["lstm-a"],
    )
    assert _models_of(engine, job.id) == {"lstm-a"}


def test_replay_naming_a_model_this_worker_lacks_fails_for_good() -> None:
    with pytest.raises(analyse.UnknownModels) as info:
        analyse.restrict(_registry(), ["cnn-z"])
    assert info.value.retryable is False


def test_analysis_audits_each_model_with_its_weights_hash_and_passes_the_shadow_list(
    engine: Engine, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_uid = _spooled_study(engine, spool, version=1)
    assert decide(engine, Waits(quiet=0, evidence=None, max_attempts=3), study_uid)
    calls: list[Any] = []
    monkeypatch.setattr(analyse, "analyse_one_series", _fake_analysis(calls))
    settings = Settings(storage={"spool_dir": str(spool.root)}, models={"shadow": ["cnn-b"]})
    job = _run_queued_analysis(engine, spool, settings, _registry())
    assert calls[0][1] == frozenset({"cnn-b"})
    events = {e.detail["model"]: e for e in _events(engine, audit.ANALYSED)}
    assert set(events) == {"cnn-a", "cnn-b", "lstm-a"}
    for name, event in events.items():
        assert event.study_uid == study_uid
        assert event.detail["weights_sha256"] == fakes.WEIGHTS[name]
        assert event.detail["job"] == job.id
        assert event.detail["shadow"] is (name == "cnn-b")
    with engine.connect() as conn:
        assert audit.verify(conn).intact


def test_analysis_that_loses_its_lease_audits_nothing(
    engine: Engine, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_uid = _spooled_study(engine, spool, version=1)
    assert decide(engine, Waits(quiet=0, evidence=None, max_attempts=3), study_uid)
    monkeypatch.setattr(analyse, "analyse_one_series", _fake_analysis([]))
    job = queue.claim(engine, OWNER, [ANALYSE], lease_seconds=60)
    assert job is not None
    queue.cancel(engine, job.id)
    ctx = WorkerContext(
        settings=Settings(storage={"spool_dir": str(spool.root)}),
        engine=engine,
        spool=spool,
        owner=OWNER,
        registry=_registry(),
    )
    with pytest.raises(queue.LeaseLost):
        analyse.run_analyse(ctx, job)
    assert _events(engine, audit.ANALYSED) == []


def test_old_instances_are_in_the_replayed_version(engine: Engine, spool: Spool) -> None:
    study_uid = _spooled_study(engine, spool)
    replay(engine, study_uid, max_attempts=3)
    study = _study(engine, study_uid)
    with engine.connect() as conn:
        series = analyse.study_series(conn, study.id, study.version - 1)
    assert sum(len(s.paths) for s in series) == 2


def test_sr_of_the_replay_names_the_earlier_sr_as_its_predecessor(
    engine: Engine, spool: Spool
) -> None:
    from pydicom import dcmread

    from daemon.report.job import build_report

    study_uid = generate_uid()
    rows.add_ct_source(engine, spool, study_uid)  # one CT instance, study at version 2
    study = _study(engine, study_uid)
    with engine.connect() as conn:
        sop = conn.execute(select(Instance.sop_instance_uid)).scalar_one()
    settings = Settings(storage={"spool_dir": str(spool.root)})
    detail = {"code": ["99T", "NOD", "Nodule"], "threshold": 0.5, "clinical_use": False}
    result = {
        "series_uid": "1.2.3",
        "model_name": "cnn-a",
        "level": "image",
        "sop_instance_uid": sop,
        "label": "nodule",
        "probability": 0.8,
        "detail": detail,
    }
    with engine.begin() as conn:
        first_job = queue.enqueue(conn, ANALYSE, analyse_key(study_uid, 1), max_attempts=1)
    rows.add_results(engine, first_job, study.id, [result])
    with engine.connect() as conn:
        built = build_report(conn, settings, study, 1, first_job)
    assert built is not None
    first_sr = built
    first_uid = str(first_sr.SOPInstanceUID)
    first_path = spool.report_path(study_uid, first_uid)
    spool.make_dirs(first_path.parent)
    first_sr.save_as(first_path, enforce_file_format=True)
    rows.add_report(engine, study.id, 1, first_uid, first_path)

    queued = replay(engine, study_uid, max_attempts=3, models=["cnn-a"])
    rows.add_results(engine, queued.job_id, study.id, [{**result, "study_version": 2}])
    with engine.connect() as conn:
        built = build_report(conn, settings, _study(engine, study_uid), 2, queued.job_id)
    assert built is not None
    second_sr = built
    predecessors = [
        item.ReferencedSOPInstanceUID
        for study_item in second_sr.PredecessorDocumentsSequence
        for series_item in study_item.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    ]
    assert predecessors == [first_uid]
    assert dcmread(first_path).SOPInstanceUID == first_uid


def test_replay_command_checks_the_model_name_against_the_models_folder(
    db_url: str,
    engine: Engine,
    spool: Spool,
    tmp_path: Path,
    config_file: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from models.manifest import write_manifest

    models_dir = tmp_path / "models"
    (models_dir / "cnn-a").mkdir(parents=True)
    write_manifest(fakes.manifest("cnn-a"), models_dir / "cnn-a")
    config = str(config_file(db_url, f'[models]\ndir = "{models_dir}"\n'))
    study_uid = _spooled_study(engine, spool)

    assert main(["replay", study_uid, "--model", "nope", "--config", config]) == 1
    assert capsys.readouterr().err == "pacs-ai: no model named 'nope'\n"
    assert _study(engine, study_uid).version == 2

    assert main(["replay", study_uid, "--model", "cnn-a", "--config", config]) == 0
    assert _job(engine, analyse_key(study_uid, 2)).payload["models"] == ["cnn-a"]
