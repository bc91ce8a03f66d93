"""Where a study stands, as one SQL expression over its rows (display and filter agree).

A study's stage is the first of these that holds, in this order:

- failed: one of its jobs is dead (an operator must retry or cancel it);
- receiving / waiting: its open version has instances (receiving while they still arrive,
  then waiting for a rule of daemon.assemble to close it: the modality's MPPS, the
  images' evidence or the quiet window; `waiting_for` says which, in the assembler's order);
- analysing: an embed, analyse or report job is queued or running;
- reported: an SR is written and a delivery is pending (or no destination is configured);
- delivered: every delivery is sent, some not confirmed (or not to be);
- verified: every delivery is confirmed by its destination;
- cancelled: an operator cancelled its analysis;
- analysed: analysed, nothing to report (`[report] no_model_sr = false`).

The same list gives the CASE the pages show and the WHERE the state filter uses, so a
study listed under "failed" always reads "failed". Each test is an EXISTS probe on an index
(see the indexes of the console's revision, and mpps_steps' study UID), evaluated only for
the rows a page walks.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import ColumnElement, and_, case, exists, literal, not_, or_

from daemon.assemble.rules import Waits
from daemon.db import mpps
from daemon.db.keys import ANALYSE, EMBED, REPORT
from daemon.db.schema import (
    Dispatch,
    DispatchState,
    Instance,
    Job,
    JobState,
    MppsState,
    Report,
    Study,
)

FAILED = "failed"
RECEIVING = "receiving"
WAITING = "waiting"
ANALYSING = "analysing"
REPORTED = "reported"
DELIVERED = "delivered"
VERIFIED = "verified"
CANCELLED = "cancelled"
ANALYSED = "analysed"
RECEIVED = "received"  # none of the above (e.g. every instance superseded)
STATES = (
    RECEIVING,
    WAITING,
    ANALYSING,
    REPORTED,
    DELIVERED,
    VERIFIED,
    FAILED,
    CANCELLED,
    ANALYSED,
)
# What each stage means to an operator (the Studies page's legend and tooltips).
MEANING = {
    RECEIVING: "instances are arriving",
    WAITING: "waiting for the modality's MPPS, the images' evidence or the quiet window",
    ANALYSING: "models running or report being written",
    REPORTED: "SR written, delivery pending",
    DELIVERED: "SR sent to every destination",
    VERIFIED: "every destination confirmed it keeps the SR",
    FAILED: "a job is dead: see Failures",
    CANCELLED: "analysis cancelled by an operator",
    ANALYSED: "analysed, nothing to report",
    RECEIVED: "received",
}
# A study whose last instance is younger than this is still receiving (at most half the
# shortest pause a rule waits for: afterwards it waits for a rule to close it).
RECEIVING_SECONDS = 5.0

# What a waiting study waits for (`waiting_for`), first that holds, as daemon.assemble.rules
# decides: an ended MPPS step's missing images, a step in progress, the images' evidence
# (until evidence_seconds after the last instance), else the quiet window.
MPPS_IMAGES = "MPPS images"
MPPS = "MPPS"
EVIDENCE = "evidence"
QUIET = "quiet window"
WAITS_FOR = (MPPS_IMAGES, MPPS, EVIDENCE, QUIET)

Stage = tuple[str, ColumnElement[bool]]


def _jobs(states: Sequence[JobState], kinds: Sequence[str] = ()) -> ColumnElement[bool]:
    where = [Job.study_id == Study.id, Job.state.in_(list(states))]
    if kinds:
        where.append(Job.kind.in_(list(kinds)))
    return exists().where(*where)


def _dispatches(state: DispatchState) -> ColumnElement[bool]:
    return exists().where(
        Report.study_id == Study.id, Dispatch.report_id == Report.id, Dispatch.state == state
    )


def _since(now: dt.datetime, seconds: float) -> dt.datetime:
    return now - dt.timedelta(seconds=seconds)


def stages(now: dt.datetime, waits: Waits) -> list[Stage]:
    """The ordered tests; a study whose last instance came after `now` minus the receiving
    window (RECEIVING_SECONDS, at most half the shortest pause of `waits`) is receiving."""
    recent = _since(now, min(RECEIVING_SECONDS, waits.shortest / 2))
    open_version = exists().where(
        Instance.study_id == Study.id, Instance.study_version == Study.version
    )
    return [
        (FAILED, _jobs((JobState.DEAD,))),
        (RECEIVING, and_(open_version, Study.last_received_at > recent)),
        (WAITING, open_version),
        (ANALYSING, _jobs((JobState.QUEUED, JobState.RUNNING), (EMBED, ANALYSE, REPORT))),
        (REPORTED, _dispatches(DispatchState.PENDING)),
        (DELIVERED, _dispatches(DispatchState.SENT)),
        (VERIFIED, _dispatches(DispatchState.CONFIRMED)),
        (REPORTED, exists().where(Report.study_id == Study.id)),
        (CANCELLED, _jobs((JobState.CANCELLED,))),
        (ANALYSED, _jobs((JobState.DONE,), (ANALYSE,))),
    ]


def stage_of(tests: list[Stage]) -> ColumnElement[str]:
    """The stage column: the first test that holds."""
    return case(*[(test, literal(name)) for name, test in tests], else_=literal(RECEIVED))


def in_stage(tests: list[Stage], name: str) -> ColumnElement[bool]:
    """Studies whose stage is `name`: its test holds and no earlier one does (its own test
    first, so a rare stage costs one probe per study walked)."""
    return or_(
        *[
            and_(test, *[not_(earlier) for _, earlier in tests[:i]])
            for i, (stage, test) in enumerate(tests)
            if stage == name
        ]
    )


def _steps(*states: MppsState) -> ColumnElement[bool]:
    """The study has an MPPS step the assembler still waits on in one of `states` (probed on
    ix_mpps_step_studies_study_uid and, by its series, ix_series_study_id)."""
    return mpps.waiting_on(Study.study_uid, Study.id, states)


def waiting_for(now: dt.datetime, waits: Waits) -> ColumnElement[str]:
    """What a waiting study's open version waits for (meaningful only for WAITING)."""
    rules: list[tuple[ColumnElement[bool], ColumnElement[str]]] = [
        (_steps(*mpps.FINAL), literal(MPPS_IMAGES)),
        (_steps(MppsState.IN_PROGRESS), literal(MPPS)),
    ]
    if waits.evidence is not None:
        rules.append((Study.last_received_at > _since(now, waits.evidence), literal(EVIDENCE)))
    return case(*rules, else_=literal(QUIET))


def waiting_meaning(what: str, waits: Waits) -> str:
    """What an operator reads for `waiting_for`: the rule, and how long it may take."""
    quiet = f"{waits.quiet:g} s after the last instance"
    return {
        MPPS_IMAGES: f"the modality's MPPS ended: waiting for the images it names (at most "
        f"{quiet})",
        MPPS: f"waiting for MPPS: the modality's procedure step is in progress (at most {quiet})",
        EVIDENCE: f"checking the images' evidence: closes {waits.evidence or 0:g} s after "
        "the last instance if every series is complete",
        QUIET: f"waiting for the quiet window: closes {quiet}",
    }[what]
