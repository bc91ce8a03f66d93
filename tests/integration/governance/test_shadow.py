"""Shadow mode: a shadow model's results are recorded, and nothing of them is ever sent."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import Engine, select

from daemon.analyse import result_rows
from daemon.config import Settings, load_settings
from daemon.db import queue
from daemon.db.schema import Study
from daemon.report.job import build_report, findings_from_results
from daemon.report.uids import sr_uid
from daemon.spool import Spool
from tests.integration.governance import fakes, rows


def test_model_listed_in_config_shadow_is_recorded_as_shadow() -> None:
    cnn = fakes.manifest("cnn-a")
    registry = fakes.FakeRegistry((fakes.loaded(cnn),))
    out = list(result_rows("1.2.3", fakes.series_result(cnn), registry, frozenset({"cnn-a"})))
    assert out and all(r["detail"]["shadow"] is True for r in out)


def test_model_not_listed_and_not_shadow_in_its_manifest_is_not_shadow() -> None:
    cnn = fakes.manifest("cnn-a")
    registry = fakes.FakeRegistry((fakes.loaded(cnn),))
    out = list(result_rows("1.2.3", fakes.series_result(cnn), registry, frozenset({"cnn-b"})))
    assert out and all(r["detail"]["shadow"] is False for r in out)


def test_manifest_shadow_marks_rows_without_any_config() -> None:
    cnn = fakes.manifest("cnn-a")
    lstm = fakes.manifest("lstm-a", kind="lstm", shadow=True)
    registry = fakes.FakeRegistry((fakes.loaded(cnn),), (fakes.loaded(lstm),))
    out = list(result_rows("1.2.3", fakes.series_result(cnn, (lstm,)), registry))
    assert {(r["model_name"], r["detail"]["shadow"]) for r in out} == {
        ("cnn-a", False),
        ("lstm-a", True),
    }


def _row(**fields: object) -> SimpleNamespace:
    base: dict[str, object] = {
        "series_uid": "1.2.3",
        "model_name": "m",
        "model_version": "1",
        "weights_sha256": "ab" * 32,
        "level": "image",
        "sop_instance_uid": "1.2.3.1",
        "frame_number": None,
        "label": "nodule",
        "probability": 0.9,
        "error": None,
        "detail": {"code": ["99T", "NOD", "Nodule"], "threshold": 0.5, "clinical_use": False},
    }
    base.update(fields)
    return SimpleNamespace(**base)


def test_shadow_results_and_shadow_failures_make_nothing_to_send() -> None:
    shadow_detail = {"code": ["99T", "NOD", "Nodule"], "threshold": 0.5, "shadow": True}
    results = [
        _row(model_name="live"),
        _row(model_name="shadowed", detail=shadow_detail),
        _row(model_name="shadowed", probability=None, error="boom", detail={"shadow": True}),
    ]
    findings, failures = findings_from_results(results, {"1.2.3.1": "1.2.840.10008.5.1.4.1.1.2"})
    assert [f.model_name for f in findings] == ["live"]
    assert failures == []


def _shadow_only_study(engine: Engine, spool: Spool) -> tuple[str, int]:
    study_uid = generate_uid()
    rows.add_ct_source(engine, spool, study_uid)
    with engine.begin() as conn:
        study_id = conn.execute(select(Study.id).where(Study.study_uid == study_uid)).scalar_one()
        job_id = queue.enqueue(conn, "analyse", f"analyse:{study_uid}:v1", max_attempts=1)
    rows.add_results(
        engine,
        job_id,
        study_id,
        [
            {
                "series_uid": "1.2.3",
                "model_name": "shadowed",
                "level": "series",
                "label": "nodule",
                "probability": 0.9,
                "detail": {"code": ["99T", "NOD", "Nodule"], "threshold": 0.5, "shadow": True},
            }
        ],
    )
    return study_uid, job_id


def _study_row(engine: Engine, study_uid: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(Study).where(Study.study_uid == study_uid)).one()


def test_study_with_only_shadow_results_gets_the_no_applicable_model_sr(
    engine: Engine, spool: Spool
) -> None:
    study_uid, job_id = _shadow_only_study(engine, spool)
    settings = Settings(storage={"spool_dir": str(spool.root)})
    with engine.connect() as conn:
        built = build_report(conn, settings, _study_row(engine, study_uid), 1, job_id)
    assert built is not None
    main = built
    assert main.SOPInstanceUID == sr_uid(study_uid, 1, ["no-applicable-model"])
    assert "shadowed" not in str(main)


def test_study_with_only_shadow_results_gets_no_sr_when_no_model_srs_are_off(
    engine: Engine, spool: Spool
) -> None:
    study_uid, job_id = _shadow_only_study(engine, spool)
    settings = Settings(storage={"spool_dir": str(spool.root)}, report={"no_model_sr": False})
    with engine.connect() as conn:
        built = build_report(conn, settings, _study_row(engine, study_uid), 1, job_id)
    assert built is None


def test_shadow_models_are_read_from_the_models_section(tmp_path: Path) -> None:
    path = tmp_path / "pacs-ai.toml"
    path.write_text('[models]\nshadow = ["cnn-b", "lstm-b"]\n')
    assert load_settings(path, environ={}).models.shadow == ["cnn-b", "lstm-b"]
    assert load_settings(None, environ={}).models.shadow == []
