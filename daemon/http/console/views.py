"""Page data: the rows of `queries`, the files of `documents` and the service's live state,
arranged as each page shows them (and as its JSON gives them)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Connection

from daemon.assemble.rules import Waits
from daemon.config import Settings
from daemon.db.audit import ChainCheck
from daemon.db.keys import ANALYSE
from daemon.db.schema import CloseReason, DispatchState, JobState, ReportKind
from daemon.dispatch.destinations import address
from daemon.dispatch.probes import last_probes
from daemon.http.console import documents, queries
from daemon.http.console.manifests import ModelEntry
from daemon.http.console.stages import MEANING, STATES, WAITS_FOR, waiting_meaning
from daemon.metrics import Metrics, associations_open
from daemon.report.completion import Completion
from daemon.spool import Spool

# Faults of the service's health that mean the receiver does not accept associations.
RECEIVER_DOWN = "receiver not running"
# Why a version closed, as daemon.assemble recorded it (its detail adds what it found).
CLOSED_BY: dict[str, str] = {
    CloseReason.MPPS: "the modality's MPPS ended the procedure and its images are here",
    CloseReason.EVIDENCE: "complete by the images' own evidence",
    CloseReason.QUIET: "the quiet window: nothing more arrived",
    CloseReason.SWEEP: "the safety sweep found it quiet (after a restart or a lost timer)",
    CloseReason.REPLAY: "an operator asked for it to be analysed again",
}
# A version closed before pacs-ai recorded why (a database from an earlier release).
NOT_RECORDED = "reason not recorded"


@dataclasses.dataclass(frozen=True)
class Destination:
    name: str
    kind: str
    address: str
    ok: bool | None
    answer: str
    probed_at: dt.datetime | None
    last_delivered_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class Chart:
    """The Overview's bar chart, laid out for an inline SVG (coordinates in its units)."""

    width: int
    height: int
    bars: list[dict[str, Any]]
    max_instances: int
    max_reported: int
    first: dt.datetime | None
    last: dt.datetime | None


CHART_W, CHART_H, CHART_PAD = 720, 160, 20


def chart(bars: list[queries.ChartBar]) -> Chart:
    """Instances as bars (left scale) and reported studies as dots (right scale)."""
    top_i = max((b.instances for b in bars), default=0) or 1
    top_r = max((b.reported for b in bars), default=0) or 1
    step = (CHART_W - 2 * CHART_PAD) / max(len(bars), 1)
    inner = CHART_H - 2 * CHART_PAD
    laid = []
    for i, b in enumerate(bars):
        h = inner * b.instances / top_i
        laid.append(
            {
                "x": round(CHART_PAD + i * step, 1),
                "w": round(max(step - 2, 1), 1),
                "y": round(CHART_H - CHART_PAD - h, 1),
                "h": round(h, 1),
                "cx": round(CHART_PAD + (i + 0.5) * step, 1),
                "cy": round(CHART_H - CHART_PAD - inner * b.reported / top_r, 1),
                "instances": b.instances,
                "reported": b.reported,
                "start": b.start,
            }
        )
    return Chart(
        CHART_W,
        CHART_H,
        laid,
        max(b.instances for b in bars) if bars else 0,
        max(b.reported for b in bars) if bars else 0,
        bars[0].start if bars else None,
        bars[-1].start if bars else None,
    )


def overview(
    conn: Connection,
    settings: Settings,
    *,
    health: Callable[[], list[str]],
    metrics: Metrics | None,
    spool: Spool,
    models: list[ModelEntry],
    chain: ChainCheck | None,
) -> dict[str, Any]:
    """Everything the Overview shows."""
    names = [d.name for d in settings.destinations]
    db = queries.overview(conn, names)
    probes = last_probes(conn, settings)
    faults = health()
    free = spool.free_bytes()
    watermark = settings.storage.min_free_mb * 2**20
    return {
        "faults": faults,
        "receiver_up": RECEIVER_DOWN not in faults,
        "associations": associations_open(metrics) if metrics is not None else None,
        "db": db,
        "chart": chart(db.chart),
        "destinations": [
            Destination(
                name=d.name,
                kind=d.kind,
                address=address(d),
                ok=probes[d.name].ok if d.name in probes else None,
                answer=probes[d.name].answer if d.name in probes else "not probed yet",
                probed_at=probes[d.name].probed_at if d.name in probes else None,
                last_delivered_at=db.last_delivered.get(d.name),
            )
            for d in settings.destinations
        ],
        "spool": {
            "dir": str(spool.root),
            "free_bytes": free,
            "watermark_bytes": watermark,
            "below_watermark": free < watermark,
        },
        "models": models,
        "audit": None
        if chain is None
        else {
            "intact": chain.intact,
            "rows": chain.rows,
            "broken_id": chain.broken_id,
            "reason": chain.reason,
        },
    }


def studies(page: queries.StudyPage, waits: Waits) -> dict[str, Any]:
    """The Studies page: its rows, the stages to filter by, and what each stage means."""
    return {
        "page": page,
        "states": STATES,
        "meaning": MEANING,
        "waiting": {what: waiting_meaning(what, waits) for what in WAITS_FOR},
    }


def closing(reason: str | None, detail: Mapping[str, Any] | None) -> str:
    """Why a version closed, as an operator reads it: the rule, then what the rule found
    (the MPPS steps, each series' evidence, and what the SR says of an incomplete or
    discontinued procedure)."""
    if reason is None:
        return NOT_RECORDED
    detail = detail or {}
    words = [CLOSED_BY.get(reason, reason)]
    if detail.get("mpps"):
        words.append(f"MPPS {', '.join(detail['mpps'])}")
    words += [f"series {uid}: {why}" for uid, why in (detail.get("evidence") or {}).items()]
    words += Completion.from_detail(detail).notes
    return "; ".join(words)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One model output for one series of a version: its highest probability and threshold."""

    version: int
    model: str
    model_version: str
    series_uid: str
    level: str
    label: str
    probability: float
    threshold: float
    positive: bool
    images: int
    top_instance: str | None
    shadow: bool
    clinical_use: bool
    format: str  # the model's format and the runtime that ran it, where the result says
    runtime: str


def findings(results: list[Any]) -> tuple[list[Finding], list[dict[str, Any]]]:
    """Findings by (version, model, series, label), most probable image first; and errors."""
    best: dict[tuple[int, str, str, str, str], Any] = {}
    count: dict[tuple[int, str, str, str, str], int] = {}
    errors = []
    for r in results:
        if r.error is not None:
            errors.append(
                {
                    "version": r.study_version,
                    "model": r.model_name,
                    "series_uid": r.series_uid,
                    "error": r.error,
                }  # fmt: skip
            )
            continue
        key = (r.study_version, r.model_name, r.series_uid, r.level, r.label or "")
        count[key] = count.get(key, 0) + 1
        if key not in best or (r.probability or 0.0) > (best[key].probability or 0.0):
            best[key] = r
    out = []
    for key, r in best.items():
        detail = r.detail or {}
        threshold = float(detail.get("threshold", 0.5))
        probability = float(r.probability or 0.0)
        out.append(
            Finding(
                version=r.study_version,
                model=r.model_name,
                model_version=r.model_version,
                series_uid=r.series_uid,
                level=r.level,
                label=r.label or "",
                probability=probability,
                threshold=threshold,
                positive=probability >= threshold,
                images=count[key],
                top_instance=r.sop_instance_uid,
                shadow=bool(detail.get("shadow")),
                clinical_use=bool(detail.get("clinical_use")),
                format=str(detail.get("format", "")),
                runtime=str(detail.get("runtime", "")),
            )
        )
    out.sort(key=lambda f: (-f.version, f.model, f.series_uid, f.label))
    return out, errors


@dataclasses.dataclass(frozen=True)
class Event:
    """One line of a study's timeline."""

    at: dt.datetime
    what: str
    detail: str
    state: str = ""


def timeline(record: queries.StudyRecord) -> list[Event]:
    """Arrivals, closings (and why), jobs finishing and deliveries, in time order."""
    events = [Event(record.first_received_at, "first instance", ""),
              Event(record.last_received_at, "last instance", "")]  # fmt: skip
    for v in record.versions:
        events.append(Event(v.first_at, f"version {v.version}", f"{v.instances} instances"))
    closed = {c.version for c in record.closed}
    for c in record.closed:
        events.append(Event(c.closed_at, f"version {c.version} closed",
                            closing(c.reason, c.detail), c.reason))  # fmt: skip
    for job in record.jobs:
        version = job.payload.get("study_version")
        if job.kind == ANALYSE and version not in closed:
            events.append(Event(job.created_at, f"version {version} closed", NOT_RECORDED))
        if job.finished_at is not None:
            events.append(
                Event(
                    job.finished_at,
                    f"{job.kind} job {job.id} {job.state}",
                    f"after {job.attempts} attempt(s)",
                    job.state,
                )
            )
        elif job.state == JobState.DEAD:
            events.append(Event(job.updated_at, f"{job.kind} job {job.id} dead", "", JobState.DEAD))
    for d in record.deliveries:
        if d.sent_at is not None:
            events.append(Event(d.sent_at, f"{d.report_kind} sent to {d.destination}",
                                f"version {d.study_version}", DispatchState.SENT))  # fmt: skip
        if d.confirmed_at is not None:
            events.append(Event(d.confirmed_at, f"{d.report_kind} confirmed by {d.destination}",
                                f"version {d.study_version}", DispatchState.CONFIRMED))  # fmt: skip
    return sorted(events, key=lambda e: e.at)


def versions(record: queries.StudyRecord) -> list[dict[str, Any]]:
    """Each version: what arrived in it, and when and why it closed (the open one has not)."""
    closed = {c.version: c for c in record.closed}
    out = []
    for v in record.versions:
        c = closed.get(v.version)
        out.append(
            {
                "version": v.version,
                "instances": v.instances,
                "first_at": v.first_at,
                "last_at": v.last_at,
                "closed_at": c.closed_at if c else None,
                "closed_by": c.reason if c else None,
                "why": closing(c.reason, c.detail) if c else None,
                "open": v.version == record.version,
            }
        )
    return out


def study(
    record: queries.StudyRecord, settings: Settings, waits: Waits, chosen_sr: str | None
) -> dict[str, Any]:
    """Everything the Study page shows (the SR of `chosen_sr`, default the newest)."""
    found, errors = findings(record.results)
    srs = [r for r in record.reports if r.kind == ReportKind.SR]
    heatmaps = [r for r in record.reports if r.kind == ReportKind.HEATMAP]
    meaning = (
        waiting_meaning(record.waiting_for, waits)
        if record.waiting_for
        else MEANING.get(record.state, "")
    )
    newest = max((r.study_version for r in heatmaps), default=None)
    shown = next((r for r in srs if r.sop_instance_uid == chosen_sr), srs[-1] if srs else None)
    sr: documents.SrText | None = None
    sr_problem = None
    if shown is not None:
        try:
            sr = documents.sr_text(shown.path)
        except documents.Unreadable as exc:
            sr_problem = str(exc)
    return {
        "study": {
            "study_uid": record.study_uid,
            "state": record.state,
            "waiting_for": record.waiting_for,
            "meaning": meaning,
            "open_version": record.version,
            "first_received_at": record.first_received_at,
            "last_received_at": record.last_received_at,
            "calling_aes": record.calling_aes,
            "facts": documents.study_facts(
                record.first_instance_path, settings.http.show_patient_data
            ),
        },
        "versions": versions(record),
        "series": [
            {"series_uid": uid, "modality": modality, "body_part": part, "instances": n}
            for uid, modality, part, n in record.series
        ],
        "timeline": timeline(record),
        "jobs": record.jobs,
        "deliveries": record.deliveries,
        "findings": found,
        "errors": errors,
        "heatmaps": [
            {
                "sop_instance_uid": h.sop_instance_uid,
                "version": h.study_version,
                "caption": documents.heatmap_caption(h.path),
            }  # fmt: skip
            for h in heatmaps
            if h.study_version == newest
        ],
        "reports": [
            {
                "sop_instance_uid": r.sop_instance_uid,
                "version": r.study_version,
                "created_at": r.created_at,
                "superseded": r is not srs[-1],
                "shown": shown is not None and r.sop_instance_uid == shown.sop_instance_uid,
            }
            for r in srs
        ],  # fmt: skip
        "sr": sr,
        "sr_problem": sr_problem,
    }


def job(shown: dict[str, Any]) -> dict[str, Any]:
    """The Job page: what `pacs-ai jobs show` shows, and why its study version closed."""
    closed = shown.get("closed_by")
    return {"job": shown, "closing": closing(closed, shown["closed_detail"]) if closed else None}
