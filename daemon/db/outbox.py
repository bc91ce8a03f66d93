"""The outbox: one `dispatches` row and one `dispatch` job per report and destination.

The report stage fills it when a report is written; `pacs-ai reports send` fills it for
reports written before a destination existed, or sends them again.
"""

from __future__ import annotations

from sqlalchemy import Connection, insert, update

from daemon.db import queue
from daemon.db.keys import DISPATCH, dispatch_key
from daemon.db.schema import Dispatch, DispatchState, utcnow


def add_dispatch(
    conn: Connection, report_id: int, study_id: int, destination: str, max_attempts: int
) -> int:
    """A pending row for `report_id` to `destination` and the job that sends it; its id."""
    dispatch_id = int(
        conn.execute(
            insert(Dispatch)
            .values(report_id=report_id, destination=destination, state=DispatchState.PENDING)
            .returning(Dispatch.id)
        ).scalar_one()
    )
    _enqueue(conn, dispatch_id, study_id, destination, max_attempts)
    return dispatch_id


def send_again(
    conn: Connection, dispatch_id: int, study_id: int, destination: str, max_attempts: int
) -> None:
    """Make a row pending again and its job queued, from zero attempts."""
    conn.execute(
        update(Dispatch)
        .where(Dispatch.id == dispatch_id)
        .values(state=DispatchState.PENDING, confirmed_at=None, updated_at=utcnow())
    )
    if not queue.requeue(conn, dispatch_key(dispatch_id)):
        _enqueue(conn, dispatch_id, study_id, destination, max_attempts)  # no-op if it runs


def _enqueue(
    conn: Connection, dispatch_id: int, study_id: int, destination: str, max_attempts: int
) -> None:
    queue.enqueue(
        conn,
        DISPATCH,
        dispatch_key(dispatch_id),
        max_attempts=max_attempts,
        study_id=study_id,
        payload={"dispatch_id": dispatch_id, "destination": destination},
    )
