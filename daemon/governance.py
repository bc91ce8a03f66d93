"""Model governance for operators: how two models agree, and replaying a study through models.

`compare` reads only the results table, so a model run in shadow mode (results recorded,
nothing sent) can be judged against the one in clinical use before it replaces it.
`replay` queues a study's analysis again; the report it leads to supersedes the earlier SR.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, select
from sqlalchemy.orm import aliased

from daemon.assemble import queue_version
from daemon.db import audit
from daemon.db.schema import CloseReason, Instance, Result, Study

DEFAULT_THRESHOLD = 0.5  # what the report stage assumes when a result names none
LEVELS = ("series", "image")  # LSTM (per series) and CNN (per image) results, kept apart


class ReplayRefused(Exception):
    """The study cannot be replayed; the message is one line for the operator."""


@dataclasses.dataclass(frozen=True)
class LabelAgreement:
    """How two models' outputs for one class label agree over the pairs both produced."""

    label: str
    pairs: int
    agreement: float
    mean_abs_diff: float
    kappa: float | None


@dataclasses.dataclass(frozen=True)
class LevelAgreement:
    """Agreement at one level: `series` (LSTM, per series) or `image` (CNN, per image)."""

    level: str
    pairs: int
    labels: tuple[LabelAgreement, ...]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What `pacs-ai results compare` prints: the overlap and agreement of two models."""

    model_a: str
    model_b: str
    study_versions: int
    series: int
    levels: tuple[LevelAgreement, ...]

    def as_dict(self) -> dict[str, Any]:
        """The `--json` form."""
        return dataclasses.asdict(self)


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's kappa of two binary raters; None when chance agreement is total (undefined)."""
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(a) / n, sum(b) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1 - chance)


def _scored(conn: Connection, model: str) -> set[tuple[int, int, str]]:
    """(study, version, series) triples a model produced a probability for."""
    rows = conn.execute(
        select(Result.study_id, Result.study_version, Result.series_uid)
        .where(Result.model_name == model, Result.error.is_(None))
        .distinct()
    )
    return {(r.study_id, r.study_version, r.series_uid) for r in rows}


def _pairs(conn: Connection, model_a: str, model_b: str) -> list[Any]:
    """Each output both models gave for the same study version, series, level, label, image."""
    a, b = aliased(Result), aliased(Result)
    same_place = and_(
        b.study_id == a.study_id,
        b.study_version == a.study_version,
        b.series_uid == a.series_uid,
        b.level == a.level,
        b.label == a.label,
        func.coalesce(b.sop_instance_uid, "") == func.coalesce(a.sop_instance_uid, ""),
        func.coalesce(b.frame_number, -1) == func.coalesce(a.frame_number, -1),
    )
    return list(
        conn.execute(
            select(
                a.level,
                a.label,
                a.probability.label("p_a"),
                b.probability.label("p_b"),
                a.detail["threshold"].as_float().label("t_a"),
                b.detail["threshold"].as_float().label("t_b"),
            )
            .join(b, same_place)
            .where(
                a.model_name == model_a,
                b.model_name == model_b,
                a.probability.is_not(None),
                b.probability.is_not(None),
            )
        )
    )


def _label_agreement(label: str, rows: list[Any]) -> LabelAgreement:
    """Decisions at each model's own threshold, and the probabilities' mean distance."""
    dec_a = [r.p_a >= (DEFAULT_THRESHOLD if r.t_a is None else r.t_a) for r in rows]
    dec_b = [r.p_b >= (DEFAULT_THRESHOLD if r.t_b is None else r.t_b) for r in rows]
    n = len(rows)
    return LabelAgreement(
        label=label,
        pairs=n,
        agreement=sum(x == y for x, y in zip(dec_a, dec_b, strict=True)) / n,
        mean_abs_diff=sum(abs(r.p_a - r.p_b) for r in rows) / n,
        kappa=cohen_kappa(dec_a, dec_b),
    )


def compare(conn: Connection, model_a: str, model_b: str) -> Comparison:
    """The agreement of two models over the study versions and series both scored."""
    scored_a, scored_b = _scored(conn, model_a), _scored(conn, model_b)
    both = scored_a & scored_b
    versions = {(s, v) for s, v, _ in scored_a} & {(s, v) for s, v, _ in scored_b}
    by_level: dict[str, dict[str, list[Any]]] = {level: {} for level in LEVELS}
    for row in _pairs(conn, model_a, model_b):
        by_level.setdefault(row.level, {}).setdefault(row.label or "", []).append(row)
    levels = tuple(
        LevelAgreement(
            level=level,
            pairs=sum(len(rows) for rows in labels.values()),
            labels=tuple(_label_agreement(lbl, rows) for lbl, rows in sorted(labels.items())),
        )
        for level, labels in by_level.items()
    )
    return Comparison(model_a, model_b, len(versions), len(both), levels)


def _fmt(value: float | None) -> str:
    """Kappa may be undefined (no variation in either rater): say so instead of printing 0."""
    return "n/a" if value is None else f"{value:.3f}"


def render_comparison(c: Comparison) -> str:
    """A table per level: label, pairs, decision agreement, mean |dp|, kappa."""
    lines = [
        f"{c.model_a} vs {c.model_b}: {c.study_versions} study versions, "
        f"{c.series} series scored by both"
    ]
    for level in c.levels:
        what = "per series (LSTM)" if level.level == "series" else f"per {level.level} (CNN)"
        lines.append(f"  {level.level} level, {what}: {level.pairs} pairs")
        if not level.labels:
            continue
        lines.append(f"    {'LABEL':<24} {'PAIRS':>7} {'AGREE':>7} {'MEAN|dP|':>9} {'KAPPA':>7}")
        for lab in level.labels:
            lines.append(
                f"    {lab.label:<24} {lab.pairs:>7} {lab.agreement:>7.3f} "
                f"{lab.mean_abs_diff:>9.3f} {_fmt(lab.kappa):>7}"
            )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Replay:
    """A queued replay: the study version it analyses and the job that will."""

    study_uid: str
    study_version: int
    job_id: int
    models: tuple[str, ...]


def known_models(models_dir: Path) -> set[str]:
    """Names of the models under `models_dir` (manifests only; no weights are loaded)."""
    from models.manifest import ManifestError
    from models.registry import scan_manifests

    try:
        return {manifest.name for _, manifest in scan_manifests(models_dir)}
    except ManifestError as exc:
        raise ReplayRefused(f"models: {exc}") from exc


def _replayable(conn: Connection, study_uid: str) -> Any:
    """The study's id and open version, or ReplayRefused saying why it cannot be replayed."""
    study = conn.execute(
        select(Study.id, Study.version).where(Study.study_uid == study_uid)
    ).one_or_none()
    if study is None:
        raise ReplayRefused(f"study {study_uid}: no such study")
    kept, purged = conn.execute(
        select(
            func.count().filter(Instance.deleted_at.is_(None)),
            func.count().filter(Instance.deleted_at.is_not(None)),
        ).where(Instance.study_id == study.id, Instance.superseded_at.is_(None))
    ).one()
    if purged:
        raise ReplayRefused(f"study {study_uid}: its files were purged from the spool")
    if not kept:
        raise ReplayRefused(f"study {study_uid}: no instances in the spool")
    return study


def check_replayable(engine: Engine, study_uid: str) -> None:
    """Refuse early, before the slower look at the models folder (`replay` checks again)."""
    with engine.connect() as conn:
        _replayable(conn, study_uid)


def replay(
    engine: Engine,
    study_uid: str,
    *,
    max_attempts: int,
    models: Sequence[str] = (),
    known: Collection[str] | None = None,
) -> Replay:
    """Queue the study's open version for analysis now (by `models` only, when named).

    The version is closed as the quiet timer closes it, but without waiting and even when
    nothing new arrived; the report then supersedes the earlier SR. Raises ReplayRefused.
    """
    if known is not None and (unknown := sorted(set(models) - set(known))):
        raise ReplayRefused(f"no model named {', '.join(map(repr, unknown))}")
    with engine.begin() as conn:
        study = _replayable(conn, study_uid)
        job_id = queue_version(
            conn,
            study.id,
            study_uid,
            study.version,
            max_attempts,
            list(models) or None,
            reason=CloseReason.REPLAY,
        )
        if job_id is None:
            raise ReplayRefused(f"study {study_uid}: changed meanwhile, try again")
        audit.record(  # last: see daemon.db.audit
            conn,
            audit.REPLAY_REQUESTED,
            study_uid=study_uid,
            study_version=study.version,
            job=job_id,
            models=list(models),
        )
    return Replay(study_uid, study.version, job_id, tuple(models))
