"""Where a study stands, as one SQL expression over its rows (display and filter agree).

A study's stage is the first of these that holds, in this order:

- failed: one of its jobs is dead (an operator must retry or cancel it);
- receiving / waiting: its open version has instances (receiving while they still arrive,
  then waiting for the quiet window to close it);
- analysing: an embed, analyse or report job is queued or running;
- reported: an SR is written and a delivery is pending (or no destination is configured);
- delivered: every delivery is sent, some not confirmed (or not to be);
- verified: every delivery is confirmed by its destination;
- cancelled: an operator cancelled its analysis;
- analysed: analysed, nothing to report (`[report] no_model_sr = false`).

The same list gives the CASE the pages show and the WHERE the state filter uses, so a
study listed under "failed" always reads "failed". Each test is an EXISTS probe on an index
(see the indexes of revision i17), evaluated only for the rows a page walks.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import ColumnElement, and_, case, exists, literal, not_, or_

from daemon.db.keys import ANALYSE, EMBED, REPORT
from daemon.db.schema import Dispatch, Instance, Job, Report, Study

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
    WAITING: "waiting for the quiet window to close the study",
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
# quiet window: afterwards it waits for the window to close).
RECEIVING_SECONDS = 5.0

Stage = tuple[str, ColumnElement[bool]]


def _jobs(states: Sequence[str], kinds: Sequence[str] = ()) -> ColumnElement[bool]:
    where = [Job.study_id == Study.id, Job.state.in_(list(states))]
    if kinds:
        where.append(Job.kind.in_(list(kinds)))
    return exists().where(*where)


def _dispatches(state: str) -> ColumnElement[bool]:
    return exists().where(
        Report.study_id == Study.id, Dispatch.report_id == Report.id, Dispatch.state == state
    )


def stages(now: dt.datetime, quiet_seconds: float) -> list[Stage]:
    """The ordered tests; a study whose last instance came after `now` minus the receiving
    window (RECEIVING_SECONDS, at most half of `quiet_seconds`) is receiving."""
    recent = now - dt.timedelta(seconds=min(RECEIVING_SECONDS, quiet_seconds / 2))
    open_version = exists().where(
        Instance.study_id == Study.id, Instance.study_version == Study.version
    )
    return [
        (FAILED, _jobs(("dead",))),
        (RECEIVING, and_(open_version, Study.last_received_at > recent)),
        (WAITING, open_version),
        (ANALYSING, _jobs(("queued", "running"), (EMBED, ANALYSE, REPORT))),
        (REPORTED, _dispatches("pending")),
        (DELIVERED, _dispatches("sent")),
        (VERIFIED, _dispatches("confirmed")),
        (REPORTED, exists().where(Report.study_id == Study.id)),
        (CANCELLED, _jobs(("cancelled",))),
        (ANALYSED, _jobs(("done",), (ANALYSE,))),
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
