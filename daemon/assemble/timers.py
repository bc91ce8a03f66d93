"""Per-study timers on APScheduler, pushed back by each arrival, that ask `decide` again;
and the sweep, which asks for every study a restart or a lost timer may have left open."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Hashable

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import Engine

from daemon.assemble.rules import Waits, decide
from daemon.assemble.versions import open_studies, queue_early
from daemon.config import Settings
from daemon.db import mpps
from daemon.db.schema import utcnow
from daemon.logsetup import kv

log = logging.getLogger(__name__)

# After an arrival or an MPPS change, `decide` runs once nothing more came for this long:
# an ended MPPS step then closes its study at once, without one query per instance of a
# burst.
SETTLE_SECONDS = 0.05
# APScheduler skips a job whose earlier run (same id) is still going; `OneAtATime` makes
# overlapping runs harmless, so the scheduler is told to let this many through.
OVERLAPPING_RUNS = 8


class OneAtATime:
    """Runs the call a key stands for (deciding one study) one at a time: asked again while
    it runs, it runs once more after, so a request that came mid-decision (an MPPS step
    ended) is never lost, and a burst of them costs one more run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: set[Hashable] = set()
        self._again: set[Hashable] = set()

    def run(self, key: Hashable, call: Callable[[], object]) -> None:
        """`call()` now, or, while `key` runs, once more by that run when it ends."""
        with self._lock:
            if key in self._busy:
                self._again.add(key)
                return
            self._busy.add(key)
        done = False
        try:
            while not done:
                call()
                with self._lock:
                    done = key not in self._again
                    self._again.discard(key)
                    if done:
                        self._busy.discard(key)
        finally:
            if not done:  # the call raised: the next request for the key starts afresh
                with self._lock:
                    self._busy.discard(key)
                    self._again.discard(key)


class Assembler:
    """The timers of every study, and the sweep; `arrived` is the receiver's callback."""

    def __init__(self, engine: Engine, settings: Settings, scheduler: BaseScheduler) -> None:
        self._engine = engine
        self._waits = Waits.from_settings(settings)
        self._early = settings.assembly.early_analysis_seconds
        self._expire = dt.timedelta(hours=settings.assembly.mpps_expire_hours)
        self._max_attempts = settings.retry.max_attempts
        self._scheduler = scheduler
        self._runs = OneAtATime()
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
        """An instance of `study_uid` was committed, or its MPPS changed: restart its timers."""
        self._restart(f"settle:{study_uid}", SETTLE_SECONDS, self._decide, study_uid)
        if self._waits.evidence is not None:
            self._restart(f"evidence:{study_uid}", self._waits.evidence, self._decide, study_uid)
        self._restart(f"quiet:{study_uid}", self._waits.quiet, self._decide, study_uid)
        if self._early is not None:
            self._restart(f"early:{study_uid}", self._early, self._fire_early, study_uid)
            self._keep(f"arriving:{study_uid}", self._early, self._fire_arriving, study_uid)

    def _restart(
        self, job_id: str, seconds: float, fire: Callable[[str], object], study_uid: str
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
                max_instances=OVERLAPPING_RUNS,
            )

    def _keep(
        self, job_id: str, seconds: float, fire: Callable[[str], object], study_uid: str
    ) -> None:
        """Run `fire` `seconds` from now unless it is already due: a beat while arrivals go on."""
        if self._scheduler.get_job(job_id) is None:
            self._scheduler.add_job(
                fire,
                "date",
                run_date=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds),
                args=[study_uid],
                id=job_id,
                replace_existing=True,
                misfire_grace_time=None,
                max_instances=OVERLAPPING_RUNS,
            )

    def _decide(self, study_uid: str) -> None:
        self._runs.run(("decide", study_uid),
                       lambda: decide(self._engine, self._waits, study_uid))

    def _fire_early(self, study_uid: str) -> None:
        early = self._early
        if early is not None:
            self._runs.run(("early", study_uid), lambda: queue_early(
                self._engine, study_uid, early, self._max_attempts))

    def _fire_arriving(self, study_uid: str) -> None:
        early = self._early
        if early is not None:
            self._runs.run(("arriving", study_uid), lambda: queue_early(
                self._engine, study_uid, early, self._max_attempts, arriving=True,
                any_study=self._waits.evidence is not None))

    def sweep(self) -> int:
        """Decide every study that may be done (a restart loses the timers), then expire the
        MPPS steps no study took in time; returns how many versions were closed."""
        with self._engine.connect() as conn:
            waiting = mpps.studies_with_ended_steps(conn)
        studies = dict.fromkeys([*waiting, *open_studies(self._engine, self._waits.shortest)])
        closed = sum(
            decide(self._engine, self._waits, study_uid, sweep=True) is not None
            for study_uid in studies
        )
        with self._engine.begin() as conn:
            expired = mpps.expire(conn, utcnow() - self._expire)
        for step in expired:
            log.warning(
                "mpps step expired: its study never completed here",
                extra=kv(step=step.sop_instance_uid, study=step.study_uid, state=step.state),
            )
        return closed
