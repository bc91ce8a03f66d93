"""Whether a study is done, and why: the one place the rules live.

A study's open version closes, first rule first:

1. ``mpps``: a step of the study (one scheduled for it, or one that made a series it holds)
   ended (COMPLETED or DISCONTINUED) and every instance its Performed Series Sequence
   names is stored, some of them in the open version.
2. ``evidence``: nothing arrived for `evidence_seconds`, no step of the study is still
   IN PROGRESS, and every series the open version touches is complete by its images'
   own evidence (daemon.assemble.evidence).
3. ``quiet`` (``sweep`` when the safety sweep finds it): nothing arrived for
   `quiet_seconds`. An ended step whose instances did not all come is then named in the
   closed version's detail, so the SR says which series were incomplete.

Closing bumps the version only if nothing arrived since the decision (one conditional
UPDATE); otherwise it does nothing and that arrival asks again. Every ended step is taken
into account by exactly one closed version (daemon.db.mpps.mark_taken).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, exists, select

from daemon.assemble.evidence import Verdict, read_facts, series_verdict
from daemon.assemble.versions import queue_version
from daemon.config import Settings
from daemon.db import mpps
from daemon.db.schema import CloseReason, Instance, MppsState, Series, Study, utcnow
from daemon.logsetup import kv

log = logging.getLogger(__name__)

UIDS_PER_QUERY = 500


@dataclasses.dataclass(frozen=True)
class Waits:
    """The pauses the rules wait for; `evidence` None when off (or not shorter than quiet)."""

    quiet: float
    evidence: float | None
    max_attempts: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Waits:
        assembly = settings.assembly
        evidence = assembly.evidence_seconds
        return cls(
            quiet=assembly.quiet_seconds,
            evidence=evidence if 0 < evidence < assembly.quiet_seconds else None,
            max_attempts=settings.retry.max_attempts,
        )

    @property
    def shortest(self) -> float:
        """The shortest pause after which a rule other than MPPS may close a study."""
        return self.quiet if self.evidence is None else self.evidence


@dataclasses.dataclass(frozen=True)
class EndedStep:
    """An ended MPPS step of the study, against what is stored."""

    id: int
    uid: str
    state: str
    reason: str | None
    expected: dict[str, int]  # series UID -> instances the step names
    arrived: dict[str, int]  # series UID -> of those, stored
    touches_open: bool  # some of its instances are in the open version

    @property
    def complete(self) -> bool:
        """Every instance the step names is stored."""
        return self.arrived == self.expected

    @property
    def closes_open(self) -> bool:
        """Complete, and the open version holds its images (or it made none)."""
        return self.complete and (self.touches_open or not sum(self.expected.values()))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the rules look at, read in one short transaction."""

    study_id: int
    study_uid: str
    version: int
    last_received_at: dt.datetime
    paused: float
    has_open: bool
    steps: tuple[EndedStep, ...]


def _stored(conn: Connection, uids: Sequence[str]) -> dict[str, Any]:
    """Current rows (study id, version) of the instances among `uids` that are stored."""
    found: dict[str, Any] = {}
    for start in range(0, len(uids), UIDS_PER_QUERY):
        found.update(
            (r.sop_instance_uid, r)
            for r in conn.execute(
                select(Instance.sop_instance_uid, Instance.study_id, Instance.study_version).where(
                    Instance.sop_instance_uid.in_(uids[start : start + UIDS_PER_QUERY]),
                    Instance.superseded_at.is_(None),
                    Instance.deleted_at.is_(None),
                )
            ).all()
        )
    return found


def _ended_step(conn: Connection, row: Any, study_id: int, version: int) -> EndedStep:
    listed = [(str(s), str(u)) for s, _cls, u in row.performed.get("instances", [])]
    stored = _stored(conn, [u for _, u in listed])
    expected: dict[str, int] = {}
    arrived: dict[str, int] = {}
    for series in row.performed.get("series", []):
        expected.setdefault(series, 0)
        arrived.setdefault(series, 0)
    for series, uid in listed:
        expected[series] = expected.get(series, 0) + 1
        arrived[series] = arrived.get(series, 0) + (uid in stored)
    touches = any(r.study_id == study_id and r.study_version == version for r in stored.values())
    return EndedStep(
        row.id, row.sop_instance_uid, row.state, row.discontinued_reason, expected, arrived, touches
    )


def snapshot(conn: Connection, study_uid: str) -> Snapshot | None:
    """The study as the rules see it now, or None when no instance of it was ever stored."""
    study = conn.execute(
        select(Study.id, Study.version, Study.last_received_at).where(Study.study_uid == study_uid)
    ).one_or_none()
    if study is None:
        return None
    has_open = conn.execute(
        select(
            exists().where(Instance.study_id == study.id, Instance.study_version == study.version)
        )
    ).scalar_one()
    steps = tuple(
        _ended_step(conn, row, study.id, study.version)
        for row in mpps.ended_steps(conn, study_uid, study.id)
    )
    paused = (utcnow() - study.last_received_at).total_seconds()
    return Snapshot(
        study.id, study_uid, study.version, study.last_received_at, paused, has_open, steps
    )


def open_series_files(conn: Connection, study_id: int, version: int) -> dict[str, list[Path]]:
    """Every current file of each series the open version touches (older versions too)."""
    touched = (
        select(Instance.series_id)
        .where(Instance.study_id == study_id, Instance.study_version == version)
        .distinct()
    )
    rows = conn.execute(
        select(Series.series_uid, Instance.path)
        .join(Series, Series.id == Instance.series_id)
        .where(
            Instance.study_id == study_id,
            Instance.series_id.in_(touched),
            Instance.superseded_at.is_(None),
            Instance.deleted_at.is_(None),
        )
        .order_by(Instance.id)
    ).all()
    files: dict[str, list[Path]] = {}
    for series_uid, path in rows:
        files.setdefault(series_uid, []).append(Path(path))
    return files


def evidence_of(engine: Engine, snap: Snapshot) -> dict[str, str] | None:
    """{series UID: why complete} when every series of the open version is complete by
    evidence, else None (the first doubt is logged at debug)."""
    with engine.connect() as conn:
        files = open_series_files(conn, snap.study_id, snap.version)
    reasons: dict[str, str] = {}
    for series_uid, paths in files.items():
        verdict = series_verdict([read_facts(p) for p in paths])
        if verdict.verdict != Verdict.COMPLETE:
            log.debug(
                "study not complete by evidence",
                extra=kv(
                    study=snap.study_uid,
                    series=series_uid,
                    verdict=verdict.verdict,
                    why=verdict.why,
                ),
            )
            return None
        reasons[series_uid] = verdict.why
    return reasons


def _mpps_detail(steps: Sequence[EndedStep]) -> dict[str, Any]:
    """What the SR must say of the ended steps: incomplete series, a discontinued procedure."""
    if not steps:
        return {}
    detail: dict[str, Any] = {"mpps": [s.uid for s in steps]}
    incomplete = [
        {"series": series, "arrived": step.arrived[series], "expected": expected}
        for step in steps
        for series, expected in step.expected.items()
        if step.arrived[series] < expected
    ]
    if incomplete:
        detail["incomplete_series"] = incomplete
    discontinued = [
        {"step": s.uid, "reason": s.reason} for s in steps if s.state == MppsState.DISCONTINUED
    ]
    if discontinued:
        detail["discontinued"] = discontinued
    return detail


def _close(
    engine: Engine, waits: Waits, snap: Snapshot, reason: CloseReason, detail: dict[str, Any]
) -> CloseReason | None:
    """Close the snapshot's version unless something arrived since it was taken (that
    arrival asks again)."""
    detail = {**detail, **_mpps_detail(snap.steps)}
    with engine.begin() as conn:
        job_id = queue_version(
            conn,
            snap.study_id,
            snap.study_uid,
            snap.version,
            waits.max_attempts,
            reason=reason,
            detail=detail,
            quiet_since=snap.last_received_at,
        )
        if job_id is None:
            return None
        mpps.mark_taken(conn, [s.id for s in snap.steps], snap.version)
    said = {
        "mpps": ",".join(detail.get("mpps", [])),
        "incomplete_series": len(detail.get("incomplete_series", [])),
        "discontinued": len(detail.get("discontinued", [])),
    }
    log.info(
        "study queued for analysis",
        extra=kv(
            study=snap.study_uid,
            version=snap.version,
            job=job_id,
            reason=reason,
            paused_s=round(snap.paused, 3),
            **{k: v for k, v in said.items() if v},
        ),
    )
    return reason


def _take_finished(engine: Engine, snap: Snapshot) -> None:
    """Ended steps whose instances all came in versions already closed: nothing is left to
    close for them, so they are taken by the last closed version."""
    finished = [s for s in snap.steps if s.complete]
    if not finished or snap.version < 2:
        return
    with engine.begin() as conn:
        mpps.mark_taken(conn, [s.id for s in finished], snap.version - 1)
    log.info(
        "mpps step ended after its study version closed",
        extra=kv(study=snap.study_uid, steps=",".join(s.uid for s in finished)),
    )


def decide(
    engine: Engine, waits: Waits, study_uid: str, *, sweep: bool = False
) -> CloseReason | None:
    """Close the study's open version if a rule says it is done; the reason, or None."""
    with engine.connect() as conn:
        snap = snapshot(conn, study_uid)
        in_progress = snap is not None and mpps.in_progress(conn, study_uid, snap.study_id)
    if snap is None:
        return None
    if not snap.has_open:
        _take_finished(engine, snap)
        return None
    if any(s.closes_open for s in snap.steps):
        return _close(engine, waits, snap, CloseReason.MPPS, {})
    if waits.evidence is not None and snap.paused >= waits.evidence and not in_progress:
        reasons = evidence_of(engine, snap)
        if reasons is not None:
            return _close(engine, waits, snap, CloseReason.EVIDENCE, {"evidence": reasons})
    if snap.paused >= waits.quiet:
        return _close(engine, waits, snap, CloseReason.SWEEP if sweep else CloseReason.QUIET, {})
    return None
