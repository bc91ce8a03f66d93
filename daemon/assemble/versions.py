"""Study versions in the database: close one (with its reason) and queue its analysis,
queue an early run, find the studies a restart may have left open."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import Connection, Engine, Row, exists, func, insert, select, update

from daemon.db import mpps, queue
from daemon.db.keys import ANALYSE, EMBED, analyse_key, embed_key
from daemon.db.schema import ClosedVersion, CloseReason, Instance, Study, utcnow
from daemon.logsetup import kv

log = logging.getLogger(__name__)


def queue_version(
    conn: Connection,
    study_id: int,
    study_uid: str,
    version: int,
    max_attempts: int,
    models: list[str] | None = None,
    *,
    reason: CloseReason,
    detail: dict[str, Any] | None = None,
    quiet_since: dt.datetime | None = None,
) -> int | None:
    """Close `version` for `reason` and queue its `analyse` job in the caller's transaction;
    the job id, or None when the version moved on meanwhile (another closer won) or, with
    `quiet_since`, when an instance arrived after that moment.

    The version is bumped in the same transaction, so instances arriving from now on join
    the next version and an analysis never misses or repeats an instance. `models`, when
    given, limits the analysis to those model names (a replay). `detail` is what the SR
    must say about how the version ended (daemon.report reads it).
    """
    still = [Study.id == study_id, Study.version == version]
    if quiet_since is not None:
        still.append(Study.last_received_at <= quiet_since)
    bumped = conn.execute(update(Study).where(*still).values(version=Study.version + 1)).rowcount
    if bumped != 1:
        return None
    conn.execute(
        insert(ClosedVersion).values(
            study_id=study_id,
            version=version,
            reason=reason,
            detail=detail or {},
            closed_at=utcnow(),
        )
    )
    payload: dict[str, Any] = {"study_uid": study_uid, "study_version": version}
    if models:
        payload["models"] = list(models)
    return queue.enqueue(
        conn,
        ANALYSE,
        analyse_key(study_uid, version),
        max_attempts=max_attempts,
        study_id=study_id,
        payload=payload,
    )


def paused_study(conn: Connection, study_uid: str, seconds: float) -> Row[Any] | None:
    """The study (id, open version) if nothing of it arrived for `seconds`, else None."""
    cutoff = utcnow() - dt.timedelta(seconds=seconds)
    study = conn.execute(
        select(Study.id, Study.version, Study.last_received_at).where(Study.study_uid == study_uid)
    ).one_or_none()
    return None if study is None or study.last_received_at > cutoff else study


def queue_early(
    engine: Engine,
    study_uid: str,
    early_seconds: float,
    max_attempts: int,
    *,
    arriving: bool = False,
    any_study: bool = False,
) -> bool:
    """Queue an `embed` job for the study's open version if it paused for `early_seconds`,
    or, `arriving`, while it still arrives, if it may close the moment it stops: its
    modality's MPPS step is IN PROGRESS, or (`any_study`: the evidence rule is in force)
    its images may vouch for it `evidence_seconds` after the last. The CNNs keep pace with
    the images meanwhile, where the quiet window would leave them time to catch up.

    Only a cache is at stake: a study that moved on, or one already queued for analysis,
    gets nothing, and the analysis does whatever the early run did not.
    """
    with engine.begin() as conn:
        study = paused_study(conn, study_uid, 0 if arriving else early_seconds)
        if study is None or (
            arriving and not any_study and not mpps.in_progress(conn, study_uid, study.id)
        ):
            return False
        arrived = conn.execute(
            select(func.count()).where(
                Instance.study_id == study.id, Instance.study_version == study.version
            )
        ).scalar_one()
        if not arrived:
            return False
        queue.enqueue(
            conn,
            EMBED,
            embed_key(study_uid, study.version, arrived, arriving=arriving),
            max_attempts=max_attempts,
            study_id=study.id,
            payload={"study_uid": study_uid, "study_version": study.version}
            | ({"arriving": True} if arriving else {}),
        )
    log.info(
        "study queued for early analysis",
        extra=kv(study=study_uid, version=study.version, instances=arrived, arriving=arriving),
    )
    return True


def open_studies(engine: Engine, paused_seconds: float) -> list[str]:
    """Studies with unanalysed instances and no arrival for `paused_seconds` (for the sweep)."""
    cutoff = utcnow() - dt.timedelta(seconds=paused_seconds)
    open_version = exists().where(
        Instance.study_id == Study.id, Instance.study_version == Study.version
    )
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(Study.study_uid).where(Study.last_received_at <= cutoff, open_version)
            ).scalars()
        )
