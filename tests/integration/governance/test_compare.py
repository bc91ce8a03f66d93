"""`results compare`: two models' agreement over what both scored, per level and label."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Engine

from daemon.cli import main
from daemon.db import queue
from daemon.governance import cohen_kappa, compare
from tests.integration.governance import rows


def _detail(threshold: float) -> dict[str, Any]:
    return {"code": ["99T", "NOD", "Nodule"], "threshold": threshold}


def _study(engine: Engine, version: int = 1) -> tuple[int, int]:
    """A study and one analyse job of it: (study id, job id)."""
    study_uid = generate_uid()
    study_id = rows.add_study(engine, study_uid, version=version + 1)
    with engine.begin() as conn:
        job_id = queue.enqueue(conn, "analyse", f"analyse:{study_uid}:v{version}", max_attempts=1)
    return study_id, job_id


def _series(model: str, series: str, label: str, p: float, t: float = 0.5) -> dict[str, Any]:
    return {
        "model_name": model,
        "series_uid": series,
        "level": "series",
        "label": label,
        "probability": p,
        "detail": _detail(t),
    }


def _image(model: str, series: str, sop: str, p: float, t: float = 0.5) -> dict[str, Any]:
    return {
        "model_name": model,
        "series_uid": series,
        "level": "image",
        "sop_instance_uid": sop,
        "label": "nodule",
        "probability": p,
        "detail": _detail(t),
    }


def _by(comparison: Any, level: str) -> Any:
    return next(lv for lv in comparison.levels if lv.level == level)


def test_series_results_agree_at_each_models_own_threshold(engine: Engine) -> None:
    study_id, job_id = _study(engine)
    rows.add_results(
        engine,
        job_id,
        study_id,
        [
            # live decides at 0.5, shadow at 0.3: 0.4 vs 0.35 is "no" vs "yes".
            _series("live", "1.1", "nodule", 0.4, 0.5),
            _series("shadow", "1.1", "nodule", 0.35, 0.3),
            _series("live", "1.2", "nodule", 0.9, 0.5),
            _series("shadow", "1.2", "nodule", 0.8, 0.3),
            _series("live", "1.3", "nodule", 0.1, 0.5),
            _series("shadow", "1.3", "nodule", 0.1, 0.3),
            _series("live", "1.4", "nodule", 0.6, 0.5),  # the shadow did not score 1.4
        ],
    )
    with engine.connect() as conn:
        result = compare(conn, "live", "shadow")
    assert (result.study_versions, result.series) == (1, 3)
    [nodule] = _by(result, "series").labels
    assert nodule.label == "nodule"
    assert nodule.pairs == 3
    assert nodule.agreement == pytest.approx(2 / 3)
    assert nodule.mean_abs_diff == pytest.approx((0.05 + 0.1 + 0.0) / 3)
    assert nodule.kappa == pytest.approx(cohen_kappa([False, True, False], [True, True, False]))
    assert _by(result, "image").pairs == 0


def test_image_results_are_compared_per_image_apart_from_series_results(engine: Engine) -> None:
    study_id, job_id = _study(engine)
    rows.add_results(
        engine,
        job_id,
        study_id,
        [
            _image("cnn-a", "1.1", "1.1.1", 0.9),
            _image("cnn-b", "1.1", "1.1.1", 0.8),
            _image("cnn-a", "1.1", "1.1.2", 0.2),
            _image("cnn-b", "1.1", "1.1.2", 0.7),
            _series("cnn-a", "1.1", "nodule", 0.9),  # no series result of cnn-b to pair with
        ],
    )
    with engine.connect() as conn:
        result = compare(conn, "cnn-a", "cnn-b")
    image = _by(result, "image")
    assert image.pairs == 2
    assert image.labels[0].agreement == pytest.approx(0.5)
    assert image.labels[0].mean_abs_diff == pytest.approx((0.1 + 0.5) / 2)
    assert _by(result, "series").pairs == 0


def test_only_study_versions_both_models_saw_are_compared(engine: Engine) -> None:
    study_id, first = _study(engine, version=1)
    with engine.begin() as conn:
        second = queue.enqueue(conn, "analyse", "analyse:x:v2", max_attempts=1)
    rows.add_results(engine, first, study_id, [_series("a", "1.1", "nodule", 0.9)])
    rows.add_results(
        engine, second, study_id, [{**_series("b", "1.1", "nodule", 0.9), "study_version": 2}]
    )
    with engine.connect() as conn:
        result = compare(conn, "a", "b")
    assert (result.study_versions, result.series) == (0, 0)
    assert all(level.pairs == 0 for level in result.levels)


def test_failed_results_are_not_compared(engine: Engine) -> None:
    study_id, job_id = _study(engine)
    rows.add_results(
        engine,
        job_id,
        study_id,
        [
            _series("a", "1.1", "nodule", 0.9),
            {**_series("b", "1.1", "nodule", 0.9), "probability": None, "error": "boom"},
        ],
    )
    with engine.connect() as conn:
        result = compare(conn, "a", "b")
    assert result.series == 0 and _by(result, "series").pairs == 0


def test_kappa_is_one_for_perfect_agreement_and_undefined_without_variation() -> None:
    assert cohen_kappa([True, False], [True, False]) == pytest.approx(1.0)
    assert cohen_kappa([True, True], [True, True]) is None
    assert cohen_kappa([], []) is None


def test_compare_command_prints_json(
    db_url: str,
    engine: Engine,
    config_file: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    study_id, job_id = _study(engine)
    rows.add_results(
        engine,
        job_id,
        study_id,
        [_series("a", "1.1", "nodule", 0.9), _series("b", "1.1", "nodule", 0.7)],
    )
    argv = ["results", "compare", "a", "b", "--json", "--config", str(config_file(db_url))]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["model_a"], data["model_b"], data["series"]) == ("a", "b", 1)
    series = next(lv for lv in data["levels"] if lv["level"] == "series")
    assert series["labels"][0]["agreement"] == 1.0
    assert series["labels"][0]["mean_abs_diff"] == pytest.approx(0.2)


def test_compare_command_prints_a_table(
    db_url: str,
    engine: Engine,
    config_file: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    study_id, job_id = _study(engine)
    rows.add_results(
        engine,
        job_id,
        study_id,
        [_series("a", "1.1", "nodule", 0.9), _series("b", "1.1", "nodule", 0.7)],
    )
    assert main(["results", "compare", "a", "b", "--config", str(config_file(db_url))]) == 0
    out = capsys.readouterr().out
    assert "a vs b: 1 study versions, 1 series scored by both" in out
    assert "nodule" in out
