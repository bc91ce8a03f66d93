"""The `report` job: a study version's results rows -> SR files in the spool -> the outbox."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.uid import Comprehensive3DSRStorage
from sqlalchemy import Connection, insert, select

from daemon import __version__
from daemon.config import Settings
from daemon.context import WorkerContext
from daemon.db import queue
from daemon.db.outbox import add_dispatch
from daemon.db.schema import ClosedVersion, Instance, Report, ReportKind, Result, Study
from daemon.logsetup import kv
from daemon.report.completion import Completion
from daemon.report.heatmap import build_heatmap_sc, heatmap_evidence
from daemon.report.inputs import CodeSpec, DeviceInfo, Evidence, Finding, SeriesFailure
from daemon.report.sr import build_no_applicable_model_sr, build_sr
from daemon.report.uids import hashed_uid, series_uid, sr_uid
from daemon.spool import Spool

log = logging.getLogger(__name__)

SOURCES_FOR_NO_MODEL = 1

ResultKey = tuple[str, str, str, str]  # series, model, level, label: one finding


def device_info(settings: Settings) -> DeviceInfo:
    """The daemon as the SR's observer device; its UID is stable per AE title."""
    uid = hashed_uid(["pacs-ai/device/v1", settings.dicom.ae_title])
    return DeviceInfo(
        ae_title=settings.dicom.ae_title, software_version=__version__, device_uid=uid
    )


def _key(r: Result) -> ResultKey:
    return (r.series_uid, r.model_name, r.level, r.label or "")


def findings_from_results(
    rows: Sequence[Result],
    sop_classes: dict[str, str],
    heatmaps: Mapping[ResultKey, Sequence[Dataset]] | None = None,
) -> tuple[list[Finding], list[SeriesFailure]]:
    """One finding per model output and series: the top image per class, or the series' value."""
    failures = [
        SeriesFailure(r.series_uid, r.model_name, r.error)
        for r in rows
        if r.error is not None and not (r.detail or {}).get("shadow")  # shadow: never sent
    ]
    best: dict[tuple[str, str, str, str], Result] = {}
    for r in rows:
        if r.error is not None or r.detail.get("shadow"):
            continue
        key = _key(r)
        if key not in best or (r.probability or 0.0) > (best[key].probability or 0.0):
            best[key] = r
    heatmaps = heatmaps or {}
    findings = [
        _finding(r, sop_classes, tuple(map(heatmap_evidence, heatmaps.get(key, ()))))
        for key, r in best.items()
    ]
    return findings, failures


def _finding(
    r: Result, sop_classes: dict[str, str], heatmaps: tuple[Evidence, ...] = ()
) -> Finding:
    scheme, value, meaning = r.detail["code"]
    if r.level == "image":
        refs: Iterable[tuple[str, int | None]] = [(r.sop_instance_uid or "", r.frame_number)]
    else:
        refs = [(uid, frame) for uid, frame in r.detail["ordering"]["slices"]]
    evidence = tuple(dict.fromkeys(Evidence(sop_classes[uid], uid, frame) for uid, frame in refs))
    return Finding(
        model_name=r.model_name,
        model_version=r.model_version,
        weights_sha256=r.weights_sha256,
        level="image" if r.level == "image" else "series",
        finding=CodeSpec(scheme, value, meaning),
        probability=min(1.0, max(0.0, float(r.probability or 0.0))),
        threshold=float(r.detail.get("threshold", 0.5)),
        evidence=evidence,
        clinical_use=bool(r.detail.get("clinical_use", False)),
        heatmaps=heatmaps,
        model_format=str(r.detail.get("format", "")),
        runtime=str(r.detail.get("runtime", "")),
    )


def build_heatmaps(
    conn: Connection, settings: Settings, study: Study, version: int, rows: Sequence[Any]
) -> dict[ResultKey, list[Dataset]]:
    """Secondary Captures of the overlays analyse saved (named in its results `rows`), grouped
    by the finding they explain, most probable image first; an overlay file that is gone is
    skipped with a warning."""
    chosen = sorted(
        (
            r for r in rows
            if r.level == "image" and r.error is None and r.detail.get("heatmap")
            and not r.detail.get("shadow")
        ),
        key=lambda r: -(r.probability or 0.0),
    )
    paths = {
        i.sop_instance_uid: i.path
        for i in _study_instances(conn, study.id, version)
    }
    device = device_info(settings)
    built: dict[ResultKey, list[Dataset]] = {}
    for number, r in enumerate(chosen, start=1):
        overlay_path = Path(r.detail["heatmap"])
        if not overlay_path.is_file() or r.sop_instance_uid not in paths:
            log.warning("heatmap overlay missing", extra=kv(path=str(overlay_path)))
            continue
        scheme, value, meaning = r.detail["code"]
        capture = build_heatmap_sc(
            pydicom.dcmread(paths[r.sop_instance_uid], stop_before_pixels=True),
            np.load(overlay_path, allow_pickle=False),
            model_name=r.model_name,
            model_version=r.model_version,
            weights_sha256=r.weights_sha256,
            finding=CodeSpec(scheme, value, meaning),
            study_version=version,
            clinical_use=bool(r.detail.get("clinical_use", False)),
            device=device,
            series_number=settings.report.series_number + 1,
            instance_number=number,
            frame_number=r.frame_number,
        )
        built.setdefault(_key(r), []).append(capture)
    return built


def _headers(paths: Iterable[str]) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _study_instances(conn: Connection, study_id: int, version: int) -> list[Instance]:
    return list(
        conn.execute(
            select(Instance)
            .where(
                Instance.study_id == study_id,
                Instance.study_version <= version,
                Instance.superseded_at.is_(None),
            )
            .order_by(Instance.id)
        ).all()  # rows, not ORM objects: there is no Session here
    )


@dataclasses.dataclass(frozen=True)
class SrPlan:
    """Everything one study version's SR is built from: equal fingerprints, equal SRs (but
    for their creation time)."""

    study_uid: str
    version: int
    findings: tuple[Finding, ...]
    failures: tuple[SeriesFailure, ...]
    sources: tuple[tuple[str, str, str], ...]  # referenced instances: (UID, sha256, path)
    previous: tuple[tuple[str, str], ...]  # the SR it supersedes: (UID, path)
    series_number: int
    device: DeviceInfo
    completion: Completion = Completion()

    @property
    def sop_instance_uid(self) -> str:
        keys = sorted({f.model_key for f in self.findings} | {f.model_name for f in self.failures})
        return sr_uid(self.study_uid, self.version, keys)

    def fingerprint(self) -> str:
        """A digest of every input (paths aside: the same bytes may move)."""
        identity = dataclasses.replace(
            self,
            sources=tuple((uid, sha) for uid, sha, _ in self.sources),  # type: ignore[arg-type]
            previous=tuple((uid, "") for uid, _ in self.previous),
        )
        return hashlib.sha256(repr((__version__, identity)).encode()).hexdigest()

    def build(self, heatmap_images: Sequence[Dataset] = ()) -> Dataset:
        """The SR itself (reads the sources' headers and the superseded SR)."""
        return build_sr(
            _headers(path for _, _, path in self.sources),
            self.findings,
            sop_instance_uid=self.sop_instance_uid,
            series_instance_uid=series_uid(self.study_uid),
            series_number=self.series_number,
            instance_number=self.version,
            device=self.device,
            previous=[pydicom.dcmread(path) for _, path in self.previous],
            failures=self.failures,
            heatmap_images=heatmap_images,
            completion=self.completion,
        )


def completion_of(conn: Connection, study_id: int, version: int) -> Completion:
    """How the study version ended, as its closing recorded it (nothing to say if unclosed)."""
    detail = conn.execute(
        select(ClosedVersion.detail).where(
            ClosedVersion.study_id == study_id, ClosedVersion.version == version
        )
    ).scalar_one_or_none()
    return Completion.from_detail(detail)


def _previous_reports(conn: Connection, study_id: int, version: int) -> list[tuple[str, str]]:
    """The study's SRs of earlier versions whose files are still there, oldest first."""
    return [
        (uid, path)
        for uid, path in conn.execute(
            select(Report.sop_instance_uid, Report.path)
            .where(
                Report.study_id == study_id,
                Report.study_version < version,
                Report.kind == ReportKind.SR,
            )
            .order_by(Report.study_version)
        ).all()
        if Path(path).is_file()
    ]


def plan_report(
    conn: Connection,
    settings: Settings,
    study: Any,
    version: int,
    rows: Sequence[Any],
    heatmaps: Mapping[ResultKey, Sequence[Dataset]] | None = None,
) -> SrPlan | None:
    """The plan of the SR for these results rows, or None when they hold nothing to report."""
    instances = _study_instances(conn, study.id, version)
    by_uid = {i.sop_instance_uid: i for i in instances}
    findings, failures = findings_from_results(
        rows, {uid: i.sop_class_uid for uid, i in by_uid.items()}, heatmaps
    )
    if not findings and not failures:
        return None
    referenced = dict.fromkeys(e.sop_instance_uid for f in findings for e in f.evidence)
    if not referenced:
        referenced = dict.fromkeys([instances[0].sop_instance_uid])
    return SrPlan(
        study_uid=study.study_uid,
        version=version,
        findings=tuple(findings),
        failures=tuple(failures),
        sources=tuple((uid, by_uid[uid].sha256, by_uid[uid].path) for uid in referenced),
        previous=tuple(_previous_reports(conn, study.id, version)[-1:]),
        series_number=settings.report.series_number,
        device=device_info(settings),
        completion=completion_of(conn, study.id, version),
    )


def _analysis_rows(conn: Connection, analyse_job_id: int) -> list[Any]:
    return list(
        conn.execute(
            select(Result).where(Result.job_id == analyse_job_id).order_by(Result.id)
        ).all()
    )


def build_report(
    conn: Connection,
    settings: Settings,
    study: Study,
    version: int,
    analyse_job_id: int,
    heatmaps: Mapping[ResultKey, Sequence[Dataset]] | None = None,
) -> Dataset | None:
    """The SR for one study version, or None when nothing is due; `heatmaps` (from
    `build_heatmaps`) are referenced from the findings they explain. A destination that
    refuses Comprehensive 3D SR gets its Enhanced SR twin, made by dispatch at send time."""
    plan = plan_report(conn, settings, study, version, _analysis_rows(conn, analyse_job_id),
                       heatmaps)
    captures = [sc for group in (heatmaps or {}).values() for sc in group]
    return _build_now(conn, settings, study, version, plan, captures)


def _build_now(
    conn: Connection,
    settings: Settings,
    study: Study,
    version: int,
    plan: SrPlan | None,
    captures: Sequence[Dataset],
) -> Dataset | None:
    """The plan's SR, or with nothing to report the no-applicable-model one (if wanted)."""
    if plan is not None:
        return plan.build(captures)
    return _no_model_report(conn, settings, study, version)


def _no_model_report(
    conn: Connection, settings: Settings, study: Study, version: int
) -> Dataset | None:
    """The short SR that says no model applied, when the site wants one."""
    instances = _study_instances(conn, study.id, version)
    if not settings.report.no_model_sr or not instances:
        return None
    previous = _previous_reports(conn, study.id, version)[-1:]
    return build_no_applicable_model_sr(
        _headers(i.path for i in instances[:SOURCES_FOR_NO_MODEL]),
        sop_instance_uid=sr_uid(study.study_uid, version, ["no-applicable-model"]),
        series_instance_uid=series_uid(study.study_uid),
        series_number=settings.report.series_number,
        instance_number=version,
        device=device_info(settings),
        previous=[pydicom.dcmread(path) for _, path in previous],
        completion=completion_of(conn, study.id, version),
    )


def _prebuilt_path(spool: Spool, plan: SrPlan) -> Path:
    return spool.cache_path(plan.study_uid, f"sr-v{plan.version}-{plan.fingerprint()}.dcm")


def prebuild_report(
    ctx: WorkerContext, study: Any, version: int, rows: Sequence[Mapping[str, Any]]
) -> bool:
    """Build, ahead of the analysis, the SR these rows will give if nothing changes: the
    report job then only sends it. True when one was built."""
    results = [SimpleNamespace(**row) for row in rows]
    with ctx.engine.connect() as conn:
        plan = plan_report(conn, ctx.settings, study, version, results)
    if plan is None:
        return False
    path = _prebuilt_path(ctx.spool, plan)
    if path.is_file():
        return False
    ctx.spool.make_dirs(path.parent)
    ctx.spool.write_atomic(path, _encode(plan.build()))
    return True


@dataclasses.dataclass(frozen=True)
class Built:
    """An SR ready to write: its identity, its bytes, and how it came to be."""

    sop_instance_uid: str
    sop_class_uid: str
    data: bytes
    findings: int
    prebuilt: bool = False

    @classmethod
    def of(cls, ds: Dataset, findings: int) -> Built:
        return cls(str(ds.SOPInstanceUID), str(ds.SOPClassUID), _encode(ds), findings)


def _report_for(
    conn: Connection,
    ctx: WorkerContext,
    study: Study,
    version: int,
    rows: Sequence[Any],
    heatmaps: Mapping[ResultKey, Sequence[Dataset]],
    captures: Sequence[Dataset],
) -> Built | None:
    """The SR to write: prebuilt when an early run foresaw exactly these inputs, else built."""
    plan = plan_report(conn, ctx.settings, study, version, rows, heatmaps)
    if plan is not None and not captures:
        prebuilt = _prebuilt_path(ctx.spool, plan)
        if prebuilt.is_file():
            return Built(plan.sop_instance_uid, Comprehensive3DSRStorage, prebuilt.read_bytes(),
                         len(plan.findings), prebuilt=True)
    built = _build_now(conn, ctx.settings, study, version, plan, captures)
    return None if built is None else Built.of(built, 0 if plan is None else len(plan.findings))


def run_report(ctx: WorkerContext, job: queue.ClaimedJob) -> None:
    """Write the SR into the spool, then record it, its outbox rows and their jobs at once."""
    version = int(job.payload["study_version"])
    analyse_job_id = int(job.payload["analyse_job_id"])
    spool: Spool = ctx.spool
    with ctx.engine.connect() as conn:
        study = conn.execute(select(Study).where(Study.id == job.study_id)).one()
        rows = _analysis_rows(conn, analyse_job_id)
        heatmaps = build_heatmaps(conn, ctx.settings, study, version, rows)
        captures = [sc for group in heatmaps.values() for sc in group]
        main = _report_for(conn, ctx, study, version, rows, heatmaps, captures)
    # Once this job's outcome is committed the overlays are in the Secondary Captures (or
    # not wanted): nothing reads them again, and each is as large as its source image.
    overlays = [Path(r.detail["heatmap"]) for r in rows if (r.detail or {}).get("heatmap")]
    if main is None:
        with ctx.engine.begin() as conn:
            queue.complete(conn, job.id, job.lease_owner)
        _remove_all(spool, overlays)
        log.info("no report for study", extra=kv(study=study.study_uid, version=version))
        return
    uid = main.sop_instance_uid
    main_path = spool.report_path(study.study_uid, uid)
    spool.make_dirs(main_path.parent)
    capture_paths = [spool.report_path(study.study_uid, sc.SOPInstanceUID) for sc in captures]
    for capture, path in zip(captures, capture_paths, strict=True):
        spool.write_atomic(path, _encode(capture))
    spool.write_atomic(main_path, main.data)
    with ctx.engine.begin() as conn:
        for capture, path in zip(captures, capture_paths, strict=True):
            capture_id = conn.execute(
                insert(Report)
                .values(
                    study_id=study.id,
                    study_version=version,
                    sop_instance_uid=str(capture.SOPInstanceUID),
                    sop_class_uid=str(capture.SOPClassUID),
                    kind=ReportKind.HEATMAP,
                    path=str(path),
                )
                .returning(Report.id)
            ).scalar_one()
            enqueue_dispatches(conn, ctx.settings, capture_id, study.id)  # before the SR's
        report_id = conn.execute(
            insert(Report)
            .values(
                study_id=study.id,
                study_version=version,
                sop_instance_uid=uid,
                sop_class_uid=main.sop_class_uid,
                path=str(main_path),
            )
            .returning(Report.id)
        ).scalar_one()
        enqueue_dispatches(conn, ctx.settings, report_id, study.id)
        queue.complete(conn, job.id, job.lease_owner)
    _remove_all(spool, overlays)
    log.info(
        "report written",
        extra=kv(
            study=study.study_uid,
            version=version,
            sr=uid,
            findings=main.findings,
            prebuilt=main.prebuilt,
        ),
    )


def _remove_all(spool: Spool, paths: Iterable[Path]) -> None:
    for path in paths:
        spool.remove(path)


def enqueue_dispatches(conn: Connection, settings: Settings, report_id: int, study_id: int) -> None:
    """One outbox row and one `dispatch` job per destination, in the caller's transaction."""
    for dest in settings.destinations:
        add_dispatch(conn, report_id, study_id, dest.name, settings.retry.max_attempts)

