"""The `analyse` job: a study version's series from the spool through the models (image CNNs
with their LSTMs, and series-level volume models) to results; and the `embed` job, which
starts the CNNs early on what has arrived, for analyse to reuse."""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.errors import InvalidDicomError
from sqlalchemy import Connection, insert, select

from daemon.context import WorkerContext
from daemon.db import audit, queue
from daemon.db.keys import REPORT, report_key
from daemon.db.schema import Instance, Result, Series, Study
from daemon.logsetup import kv
from daemon.metrics import Metrics
from daemon.spool import Spool, uid_name

if TYPE_CHECKING:
    from models.infer import FileOutputs, SeriesResult
    from models.manifest import Manifest
    from models.ordering import OrderReport, SliceRef
    from models.registry import LoadedModel, Registry
    from models.volume import VolumeResult

log = logging.getLogger(__name__)

_ROW_DEFAULTS: dict[str, Any] = {
    "sop_instance_uid": None,
    "frame_number": None,
    "label": None,
    "probability": None,
    "error": None,
}


class AnalyseFailed(Exception):
    """The study cannot be analysed as it stands (e.g. a spooled file is missing)."""

    retryable = True


class UnknownModels(AnalyseFailed):
    """The job names models this worker has not loaded: no retry brings them."""

    retryable = False


@dataclasses.dataclass(frozen=True)
class SeriesFiles:
    """One series of a study version as the spool holds it."""

    series_uid: str
    paths: tuple[Path, ...]


def study_series(conn: Connection, study_id: int, version: int) -> list[SeriesFiles]:
    """The current files of every series, as of `version` (later arrivals belong to the next)."""
    rows = conn.execute(
        select(Series.series_uid, Instance.path)
        .join(Series, Series.id == Instance.series_id)
        .where(
            Instance.study_id == study_id,
            Instance.study_version <= version,
            Instance.superseded_at.is_(None),
            Instance.deleted_at.is_(None),
        )
        .order_by(Series.id, Instance.id)
    ).all()
    grouped: dict[str, list[Path]] = {}
    for series_uid, path in rows:
        grouped.setdefault(series_uid, []).append(Path(path))
    return [SeriesFiles(uid, tuple(paths)) for uid, paths in grouped.items()]


def _check_files(series: Sequence[SeriesFiles]) -> None:
    for s in series:
        for path in s.paths:
            if not path.is_file():
                raise AnalyseFailed(f"instance file missing from the spool: {path}")


def _model_fields(manifest: Any) -> dict[str, Any]:
    return {
        "model_name": manifest.name,
        "model_version": manifest.version,
        "weights_sha256": manifest.weights_sha256,
    }


def _class_detail(
    manifest: Any, index: int, shadow: frozenset[str], identity: Any
) -> dict[str, Any]:
    """What the report needs of one class: its code and threshold, the model's use and
    shadow status, and the format and runtime that ran it."""
    label = manifest.classes[index]
    return {
        "code": [label.code.scheme, label.code.value, label.code.meaning],
        "threshold": label.threshold,
        "clinical_use": manifest.clinical_use,
        "shadow": manifest.shadow or manifest.name in shadow,
        "format": identity.format,
        "runtime": identity.runtime,
    }


def _ordering(ordering: OrderReport, rows: Sequence[SliceRef]) -> dict[str, Any]:
    """How a series was ordered, and its slices in that order (a series result's evidence)."""
    return {
        "method": ordering.method,
        "spacing_mm": ordering.spacing_mm,
        "gaps": len(ordering.gaps),
        "duplicates": len(ordering.duplicates),
        "notes": list(ordering.notes),
        "slices": [[r.sop_instance_uid, r.frame] for r in rows],
    }


def _series_rows(
    series_uid: str,
    manifest: Any,
    probabilities: Any,
    ordering: dict[str, Any],
    shadow: frozenset[str],
    identity: Any,
) -> Iterator[dict]:
    """One row per class of a series-level result (an LSTM's or a volume model's)."""
    for i, label in enumerate(manifest.classes):
        yield {
            **_model_fields(manifest),
            "series_uid": series_uid,
            "level": "series",
            "label": label.name,
            "probability": float(probabilities[i]),
            "detail": {**_class_detail(manifest, i, shadow, identity), "ordering": ordering},
        }


def result_rows(
    series_uid: str,
    result: SeriesResult,
    registry: Registry,
    shadow: frozenset[str] = frozenset(),
) -> Iterator[dict]:
    """Rows for one CNN's run: every image and class, then each LSTM's series classes.

    Models named in `shadow` (the site's `[models] shadow`) are marked like a manifest's
    `shadow = true`: recorded, never reported.
    """
    identity = {m.name: m.identity for m in registry.models}
    cnn = result.cnn
    details = [_class_detail(cnn, i, shadow, identity[cnn.name]) for i in range(len(cnn.classes))]
    for row, probabilities in zip(result.rows, result.image_probabilities, strict=True):
        for i, label in enumerate(cnn.classes):
            yield {
                **_model_fields(cnn),
                "series_uid": series_uid,
                "level": "image",
                "sop_instance_uid": row.sop_instance_uid,
                "frame_number": row.frame,
                "label": label.name,
                "probability": float(probabilities[i]),
                "detail": details[i],
            }
    ordering = _ordering(result.ordering, result.rows)
    for lstm in result.series:
        yield from _series_rows(series_uid, lstm.manifest, lstm.probabilities, ordering, shadow,
                                identity[lstm.manifest.name])


def volume_rows(
    series_uid: str, result: VolumeResult, model: LoadedModel, shadow: frozenset[str]
) -> Iterator[dict]:
    """Rows of a series-level model's run: each class, with the ordered slices it read."""
    ordering = _ordering(result.ordering, result.rows)
    yield from _series_rows(series_uid, result.model, result.probabilities, ordering, shadow,
                            model.identity)


@dataclasses.dataclass(frozen=True)
class HeatmapSink:
    """Where analyse leaves explainability overlays for the report stage, and how many."""

    spool: Spool
    study_uid: str
    version: int
    top_k: int

    def path(self, model: str, ref: SliceRef, label: str) -> Path:
        """One overlay's file: named by study version, model, image, frame and class."""
        uid, frame = uid_name(ref.sop_instance_uid), ref.frame or 0
        name = f"v{self.version}-{model}-{uid}-{frame}-{label}.npy"
        return self.spool.reports_dir / uid_name(self.study_uid) / "heatmaps" / name


def add_heatmaps(
    rows: list[dict[str, Any]], result: SeriesResult, cnn: LoadedModel, sink: HeatmapSink
) -> None:
    """Grad-CAM overlays of the top-k images per class at or above its threshold, saved in
    the spool; each such image row names its file in detail["heatmap"]."""
    from models.gradcam import heatmap_overlay
    from models.preprocess import PreprocessError

    manifest = cnn.manifest
    by_key = {
        (r["sop_instance_uid"], r["frame_number"], r["label"]): r
        for r in rows
        if r["level"] == "image" and r["model_name"] == manifest.name
    }
    shadow = any(r["detail"].get("shadow") for r in by_key.values())
    if not manifest.heatmaps or sink.top_k <= 0 or shadow:
        return  # a shadow model is never reported, so never explained
    probabilities = result.image_probabilities
    for index, label in enumerate(manifest.classes):
        for j in np.argsort(-probabilities[:, index], kind="stable")[: sink.top_k]:
            if probabilities[j, index] < label.threshold:
                break
            ref = result.rows[int(j)]
            try:
                overlay = heatmap_overlay(cnn, ref.path, index, ref.frame)
            except (PreprocessError, ValueError, OSError) as exc:
                log.warning(
                    "heatmap failed",
                    extra=kv(model=manifest.name, sop=ref.sop_instance_uid, error=str(exc)[:300]),
                )
                continue
            path = sink.path(manifest.name, ref, label.name)
            buffer = io.BytesIO()
            np.save(buffer, overlay, allow_pickle=False)
            sink.spool.make_dirs(path.parent)
            sink.spool.write_atomic(path, buffer.getvalue())
            row = by_key[(ref.sop_instance_uid, ref.frame, label.name)]
            row["detail"] = {**row["detail"], "heatmap": str(path)}


@dataclasses.dataclass(frozen=True)
class OutputsCache:
    """Each CNN's outputs per series, kept in the spool, so no file goes through a CNN twice:
    not after an early run, nor for the study's next version or a replay."""

    spool: Spool
    study_uid: str

    def _path(self, series_uid: str, cnn: Manifest) -> Path:
        name = f"{uid_name(series_uid)}.{cnn.name}-{cnn.weights_sha256[:16]}.npz"
        return self.spool.cache_path(self.study_uid, name)

    def load(self, series_uid: str, cnn: Manifest) -> dict[Path, FileOutputs]:
        """What was kept (each entry is still checked against its file before use)."""
        from models.infer import outputs_from_bytes

        path = self._path(series_uid, cnn)
        try:
            return outputs_from_bytes(path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            log.warning("analysis cache ignored", extra=kv(path=str(path), error=str(exc)[:200]))
            return {}

    def keep(
        self,
        series_uid: str,
        cnn: Manifest,
        outputs: Mapping[Path, FileOutputs],
        known: Mapping[Path, FileOutputs],
    ) -> None:
        """Keep `outputs` unless they hold nothing that `known` did not."""
        from models.infer import outputs_to_bytes

        if not outputs or all(known.get(path) is o for path, o in outputs.items()):
            return
        path = self._path(series_uid, cnn)
        self.spool.make_dirs(path.parent)
        self.spool.write_atomic(path, outputs_to_bytes(outputs))


def _failed(series_uid: str, model: Any, exc: Exception, shadow: frozenset[str]) -> dict:
    """Log a model's failure on a series and make its error row (the rest goes on); `model`
    None: the series could not even be read to choose its models."""
    name = "(selection)" if model is None else model.name
    log.warning(
        "series analysis failed",
        extra=kv(series=series_uid, model=name, error=str(exc)[:300]),
    )
    return _failure_row(series_uid, name, exc, None if model is None else model.manifest, shadow)


def _analysed(series_uid: str, model: str, seconds: float, early: bool, **counts: int) -> None:
    log.info(
        "series analysed early" if early else "series analysed",
        extra=kv(series=series_uid, model=model, **counts, seconds=round(seconds, 3)),
    )


def analyse_one_series(
    series: SeriesFiles,
    registry: Registry,
    metrics: Metrics | None = None,
    shadow: frozenset[str] = frozenset(),
    heatmaps: HeatmapSink | None = None,
    cache: OutputsCache | None = None,
    *,
    early: bool = False,
) -> list[dict[str, Any]]:
    """Every applicable model on one series (each image model with its LSTMs, then each
    series-level model); a failure becomes a row naming the error.
    `early`: a run ahead of the analysis proper, logged as such."""
    from models.infer import infer_series
    from models.preprocess import PreprocessError, read_deferred
    from models.registry import SeriesInfo
    from models.volume import infer_volume

    model_errors = (PreprocessError, InvalidDicomError, ValueError)
    try:
        headers = {path: read_deferred(path) for path in series.paths}
        info = SeriesInfo.from_headers(list(headers.values()))
    except (*model_errors, OSError) as exc:
        return [_failed(series.series_uid, None, exc, shadow)]
    volumes = registry.select_volumes(info)
    if not volumes:
        headers.clear()  # only a series-level model reads them again
    rows: list[dict[str, Any]] = []
    for choice in registry.select(info):
        known = cache.load(series.series_uid, choice.cnn.manifest) if cache else {}
        try:
            result = infer_series(series.paths, choice, known=known)
        except model_errors as exc:
            rows.append(_failed(series.series_uid, choice.cnn, exc, shadow))
            continue
        if cache is not None:
            cache.keep(series.series_uid, choice.cnn.manifest, result.outputs, known)
        if metrics is not None:
            metrics.inference_seconds.labels(choice.cnn.name).observe(result.timing.total_s)
        reused = sum(1 for path, o in result.outputs.items() if known.get(path) is o)
        _analysed(series.series_uid, choice.cnn.name, result.timing.total_s, early,
                  images=len(result.rows), reused=reused)
        produced = list(result_rows(series.series_uid, result, registry, shadow))
        if heatmaps is not None:
            add_heatmaps(produced, result, choice.cnn, heatmaps)
        rows.extend(produced)
    for model in volumes:
        try:
            volume = infer_volume(series.paths, model, headers=headers)
        except model_errors as exc:
            rows.append(_failed(series.series_uid, model, exc, shadow))
            continue
        if metrics is not None:
            metrics.inference_seconds.labels(model.name).observe(volume.timing.total_s)
        _analysed(series.series_uid, model.name, volume.timing.total_s, early,
                  slices=len(volume.rows))
        rows.extend(volume_rows(series.series_uid, volume, model, shadow))
    return rows


def _failure_row(
    series_uid: str,
    model: str,
    exc: Exception,
    manifest: Manifest | None = None,
    shadow: frozenset[str] = frozenset(),
) -> dict:
    detail: dict[str, Any] = {"clinical_use": manifest.clinical_use if manifest else False}
    if manifest is not None and (manifest.shadow or manifest.name in shadow):
        detail["shadow"] = True
    return {
        "series_uid": series_uid,
        "model_name": model,
        "model_version": manifest.version if manifest else "",
        "weights_sha256": manifest.weights_sha256 if manifest else "",
        "level": "series",
        "error": f"{type(exc).__name__}: {exc}"[:2000],
        "detail": detail,
    }


def restrict(registry: Registry, names: Sequence[str]) -> Registry:
    """The registry limited to `names` (a replay's models), keeping the CNNs their LSTMs need.

    Raises UnknownModels when a name is not loaded here.
    """
    loaded = {m.name for m in registry.models}
    unknown = sorted(set(names) - loaded)
    if unknown:
        raise UnknownModels(f"models not loaded by this worker: {', '.join(unknown)}")
    lstms = tuple(m for m in registry.lstms if m.name in names)
    needed = set(names) | {str(m.manifest.embedding_model) for m in lstms}
    return dataclasses.replace(
        registry,
        cnns=tuple(m for m in registry.cnns if m.name in needed),
        lstms=lstms,
        volumes=tuple(m for m in registry.volumes if m.name in names),
    )


def _requested(rows: list[dict[str, Any]], names: Sequence[str] | None) -> list[dict[str, Any]]:
    """Rows of the requested models only (a CNN run just to feed a named LSTM is not kept)."""
    if not names:
        return rows
    return [r for r in rows if r["model_name"] in names or r.get("error") is not None]


def _audit_models(
    conn: Connection, study_uid: str, version: int, job_id: int, rows: list[dict[str, Any]]
) -> None:
    """One audit row per model that ran on the study version, naming its weights' hash."""
    ran: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        if not row.get("weights_sha256"):
            continue  # a series no model could even be chosen for
        key = (row["model_name"], row["model_version"], row["weights_sha256"])
        entry = ran.setdefault(key, {"results": 0, "errors": 0, "shadow": False})
        entry["errors" if row.get("error") is not None else "results"] += 1
        entry["shadow"] = entry["shadow"] or bool(row.get("detail", {}).get("shadow"))
    for (name, model_version, sha), counts in sorted(ran.items()):
        audit.record(
            conn,
            audit.ANALYSED,
            study_uid=study_uid,
            study_version=version,
            job=job_id,
            model=name,
            model_version=model_version,
            weights_sha256=sha,
            **counts,
        )


def run_analyse(ctx: WorkerContext, job: queue.ClaimedJob) -> None:
    """Analyse one study version; results, the report job and completion commit together."""
    version = int(job.payload["study_version"])
    with ctx.engine.connect() as conn:
        study = conn.execute(select(Study).where(Study.id == job.study_id)).one()
        series = study_series(conn, study.id, version)
    _check_files(series)
    names = job.payload.get("models") or None
    registry = restrict(ctx.registry, names) if names else ctx.registry
    shadow = frozenset(ctx.settings.models.shadow)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    heatmaps = HeatmapSink(ctx.spool, study.study_uid, version, ctx.settings.report.heatmap_top_k)
    cache = OutputsCache(ctx.spool, study.study_uid)
    for s in series:
        produced = analyse_one_series(s, registry, ctx.metrics, shadow, heatmaps, cache)
        rows.extend(_requested(produced, names))
    with ctx.engine.begin() as conn:
        if rows:
            conn.execute(
                insert(Result),
                [
                    {
                        **_ROW_DEFAULTS,
                        **row,
                        "job_id": job.id,
                        "study_id": study.id,
                        "study_version": version,
                    }
                    for row in rows
                ],
            )
        queue.enqueue(
            conn,
            REPORT,
            report_key(study.study_uid, version),
            max_attempts=ctx.settings.retry.max_attempts,
            study_id=study.id,
            payload={
                "study_uid": study.study_uid,
                "study_version": version,
                "analyse_job_id": job.id,
            },
        )
        queue.complete(conn, job.id, job.lease_owner)
        _audit_models(conn, study.study_uid, version, job.id, rows)  # last: see daemon.db.audit
    log.info(
        "study analysed",
        extra=kv(
            study=study.study_uid,
            version=version,
            series=len(series),
            results=len(rows),
            seconds=round(time.monotonic() - started, 3),
        ),
    )


def embed_series(series: SeriesFiles, registry: Registry, cache: OutputsCache) -> None:
    """Run each CNN that applies to the series so far over the files it has not seen. What
    fails here is left for the analysis to record."""
    from models.infer import embed_files
    from models.preprocess import PreprocessError
    from models.registry import SeriesInfo

    try:
        info = SeriesInfo.from_files(series.paths)
    except (PreprocessError, InvalidDicomError, OSError, ValueError):
        return
    cnns = {choice.cnn.name: choice.cnn for choice in registry.select(info)}
    for cnn in cnns.values():
        known = cache.load(series.series_uid, cnn.manifest)
        try:
            embedded = embed_files(series.paths, cnn, known=known)
        except (PreprocessError, InvalidDicomError, ValueError, OSError) as exc:
            log.info(
                "early analysis stopped",
                extra=kv(series=series.series_uid, model=cnn.name, error=str(exc)[:300]),
            )
            continue
        cache.keep(series.series_uid, cnn.manifest, embedded.outputs, known)


# Builds the SR an early run's rows foretell (the report stage's `prebuild_report`).
Prebuild = Callable[[Any, int, list[dict[str, Any]]], bool]


def _explains(ctx: WorkerContext) -> bool:
    """Whether analyses make heatmaps, which an early run does not (so it cannot foresee
    the SR that references them)."""
    return ctx.settings.report.heatmap_top_k > 0 and any(
        m.manifest.heatmaps for m in ctx.registry.cnns
    )


def run_embed(ctx: WorkerContext, job: queue.ClaimedJob, prebuild: Prebuild | None = None) -> None:
    """Start the CNNs on a study still arriving; nothing to do once its version is closed.

    With `prebuild`, the early run goes all the way: every model, the rows the analysis
    would write, and the SR they make, kept for the report job while nothing changes;
    but not while the study is still arriving (`arriving` in the payload): then only the
    CNNs run, on what came so far.
    """
    version = int(job.payload["study_version"])
    with ctx.engine.connect() as conn:
        study = conn.execute(select(Study).where(Study.id == job.study_id)).one()
        series = study_series(conn, study.id, version) if study.version == version else []
    started = time.monotonic()
    cache = OutputsCache(ctx.spool, study.study_uid)
    built = False
    if series and prebuild is not None and not _explains(ctx) and not job.payload.get("arriving"):
        shadow = frozenset(ctx.settings.models.shadow)
        rows = [
            {**_ROW_DEFAULTS, **row}
            for s in series
            for row in analyse_one_series(s, ctx.registry, None, shadow, None, cache, early=True)
        ]
        with ctx.engine.connect() as conn:
            unchanged = study_series(conn, study.id, version) == series
        built = unchanged and prebuild(study, version, rows)
    else:
        for s in series:
            embed_series(s, ctx.registry, cache)
    with ctx.engine.begin() as conn:
        queue.complete(conn, job.id, job.lease_owner)
    log.info(
        "early analysis done",
        extra=kv(
            study=study.study_uid,
            version=version,
            series=len(series),
            report=built,
            seconds=round(time.monotonic() - started, 3),
        ),
    )
