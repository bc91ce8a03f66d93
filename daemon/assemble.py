"""Decide when a study has finished arriving: quiet for N seconds, then one `analyse` job
(and, after a shorter pause, an `embed` job that starts the CNNs on what has arrived)."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import Connection, Engine, Row, exists, func, select, update

from daemon.config import Settings
from daemon.db import queue
from daemon.db.keys import ANALYSE, EMBED, analyse_key, embed_key
from daemon.db.schema import Instance, Study, utcnow
from daemon.logsetup import kv

log = logging.getLogger(__name__)


def _paused_study(conn: Connection, study_uid: str, seconds: float) -> Row[Any] | None:
    """The study (id, open version) if nothing of it arrived for `seconds`, else None."""
    cutoff = utcnow() - dt.timedelta(seconds=seconds)
    study = conn.execute(
        select(Study.id, Study.version, Study.last_received_at).where(
            Study.study_uid == study_uid
        )
    ).one_or_none()
    return None if study is None or study.last_received_at > cutoff else study


def close_version(engine: Engine, study_uid: str, quiet_seconds: float, max_attempts: int) -> bool:
    """Queue the study's open version if it has been quiet long enough; True when queued.

    The version is bumped in the same transaction, so instances arriving from now on join
    the next version and an analysis never misses or repeats an instance.
    """
    with engine.begin() as conn:
        study = _paused_study(conn, study_uid, quiet_seconds)
        if study is None:
            return False
        pending = conn.execute(
            select(
                exists().where(
                    Instance.study_id == study.id,
                    Instance.study_version == study.version,
                )
            )
        ).scalar_one()
        if not pending:
            return False
        job_id = queue_version(conn, study.id, study_uid, study.version, max_attempts)
    if job_id is None:
        return False
    log.info(
        "study queued for analysis",
        extra=kv(study=study_uid, version=study.version, job=job_id),
    )
    return True


def queue_early(engine: Engine, study_uid: str, early_seconds: float, max_attempts: int) -> bool:
    """Queue an `embed` job for the study's open version if it paused for `early_seconds`.

    Only a cache is at stake: a study that moved on, or one already queued for analysis,
    gets nothing, and the analysis does whatever the early run did not.
    """
    with engine.begin() as conn:
        study = _paused_study(conn, study_uid, early_seconds)
        if study is None:
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
            embed_key(study_uid, study.version, arrived),
            max_attempts=max_attempts,
            study_id=study.id,
            payload={"study_uid": study_uid, "study_version": study.version},
        )
    log.info(
        "study queued for early analysis",
        extra=kv(study=study_uid, version=study.version, instances=arrived),
    )
    return True


def queue_version(
    conn: Connection,
    study_id: int,
    study_uid: str,
    version: int,
    max_attempts: int,
    models: list[str] | None = None,
) -> int | None:
    """Close `version` and queue its `analyse` job in the caller's transaction; the job id.

    None when the version moved on meanwhile (another closer won). `models`, when given,
    limits the analysis to those model names (a replay).
    """
    bumped = conn.execute(
        update(Study)
        .where(Study.id == study_id, Study.version == version)
        .values(version=Study.version + 1)
    ).rowcount
    if bumped != 1:
        return None
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


def quiet_studies(engine: Engine, quiet_seconds: float) -> list[str]:
    """Studies with unanalysed instances and no arrival for `quiet_seconds` (the safety net)."""
    cutoff = utcnow() - dt.timedelta(seconds=quiet_seconds)
    open_version = exists().where(
        Instance.study_id == Study.id, Instance.study_version == Study.version
    )
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(Study.study_uid).where(Study.last_received_at <= cutoff, open_version)
            ).scalars()
        )


class Assembler:
    """A per-study quiet timer on APScheduler, pushed back by each arrival, plus a sweep."""

    def __init__(self, engine: Engine, settings: Settings, scheduler: BaseScheduler) -> None:
        self._engine = engine
        self._quiet = settings.assembly.quiet_seconds
        self._early = settings.assembly.early_analysis_seconds
        self._max_attempts = settings.retry.max_attempts
        self._scheduler = scheduler
        scheduler.add_job(
            self.sweep,
            "interval",
            seconds=settings.assembly.sweep_seconds,
            id="assembly-sweep",
            next_run_time=dt.datetime.now(dt.UTC),
            coalesce=True,
            max_instances=1,
        )

    def arrived(self, study_uid: str) -> None:
        """An instance of `study_uid` was committed: restart its quiet (and early) timer."""
        self._restart(f"quiet:{study_uid}", self._quiet, self._fire, study_uid)
        if self._early is not None:
            self._restart(f"early:{study_uid}", self._early, self._fire_early, study_uid)

    def _restart(
        self, job_id: str, seconds: float, fire: Callable[[str], None], study_uid: str
    ) -> None:
        run_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
        try:
            self._scheduler.reschedule_job(job_id, trigger="date", run_date=run_at)
        except JobLookupError:
            self._scheduler.add_job(
                fire,
                "date",
                run_date=run_at,
                args=[study_uid],
                id=job_id,
                replace_existing=True,
                misfire_grace_time=None,
            )

    def _fire(self, study_uid: str) -> None:
        close_version(self._engine, study_uid, self._quiet, self._max_attempts)

    def _fire_early(self, study_uid: str) -> None:
        if self._early is not None:
            queue_early(self._engine, study_uid, self._early, self._max_attempts)

    def sweep(self) -> int:
        """Queue what a restart or a lost timer left behind; returns how many were queued."""
        queued = 0
        for study_uid in quiet_studies(self._engine, self._quiet):
            queued += close_version(self._engine, study_uid, self._quiet, self._max_attempts)
        return queued
